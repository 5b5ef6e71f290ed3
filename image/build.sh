#!/bin/sh
# Build a bootable dicomesh disk image with mmdebstrap, Debian packages only.
#
#   image/build.sh amd64 UPDATE_PUBKEY OUTDIR   -> OUTDIR/dicomesh-amd64.raw + .qcow2 (UEFI)
#   image/build.sh arm64 UPDATE_PUBKEY OUTDIR   -> OUTDIR/dicomesh-arm64.raw (Raspberry Pi 4/5)
#
# UPDATE_PUBKEY is the Ed25519 public key (PEM) firmware bundles must be signed with; it is
# baked into /etc/dicomesh/update.pub. The image holds no private key, no ssh host key, no
# password and no machine-id: dicomesh-firstboot.service makes them on the device.
#
# Runs as root (mmdebstrap's root mode: the tree's owners must be real for `mke2fs -d`) on a
# Debian 12 build host with: mmdebstrap, e2fsprogs (mke2fs -d), dosfstools, mtools, fdisk
# (sfdisk), qemu-utils (qemu-img), git, python3 with pip (PYTHON=, the wheelhouse); for arm64 on
# x86 also qemu-user-static + binfmt-support with binfmt_misc mounted (the foreign chroot's
# maintainer scripts run through binfmt). No loop device, no mount: file systems are filled
# with `mke2fs -d` / `mcopy` and put together with dd.
#
# Layout (GPT on x86, MBR on the Pi whose firmware needs it):
#   1 boot   vfat  256 MiB   ESP with systemd-boot (x86) / Pi firmware, kernel, initrd
#   2 root   ext4  2 GiB     mounted read-only (LABEL=dm-root)
#   3 state  ext4  1 GiB     /data: /var/lib, /var/log, /opt/dicomesh (A/B slots); grown to
#                            the end of the disk at boot (dicomesh-grow-state.service)
# The machine-id saved there by first boot is bind-mounted over the root's empty
# /etc/machine-id from the initramfs (overlay/etc/initramfs-tools/scripts/init-bottom).
#
# Not run in CI (minutes of downloads and CPU); `make image` / `make image-boot-test` run it.
set -eu

ARCH=${1:?arch: amd64 or arm64}
PUBKEY=${2:?update public key (PEM)}
OUT=${3:?output directory}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-python3}

case "$ARCH" in
amd64) KERNEL="linux-image-amd64,systemd-boot-efi"; MACHINE=x86_64 ;;
arm64) KERNEL="linux-image-arm64,raspi-firmware"; MACHINE=aarch64 ;;
*) echo "build.sh: unknown arch $ARCH (amd64 or arm64)" >&2; exit 2 ;;
esac

# Fail early, naming every missing piece (Debian package in brackets).
missing=""
need() { command -v "$1" >/dev/null 2>&1 || missing="$missing $1 [$2]"; }
need mmdebstrap mmdebstrap
need mke2fs e2fsprogs
need mkfs.vfat dosfstools
need mcopy mtools
need sfdisk fdisk
need qemu-img qemu-utils
need git git
need "$PYTHON" python3
"$PYTHON" -m pip --version >/dev/null 2>&1 || missing="$missing pip [python3-pip]"
if [ "$ARCH" = arm64 ] && [ "$(dpkg --print-architecture 2>/dev/null)" != arm64 ]; then
    need qemu-aarch64-static qemu-user-static
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] \
        || missing="$missing binfmt:qemu-aarch64 [binfmt-support + qemu-user-static, binfmt_misc mounted]"
fi
if [ -n "$missing" ]; then
    echo "build.sh: missing on the build host:$missing" >&2
    echo "  apt-get install mmdebstrap e2fsprogs dosfstools mtools fdisk qemu-utils git python3-pip" >&2
    exit 2
fi
[ "$(id -u)" = 0 ] || { echo "build.sh: run as root (mmdebstrap root mode, file owners)" >&2; exit 2; }
[ -r "$PUBKEY" ] || { echo "build.sh: cannot read update public key $PUBKEY" >&2; exit 2; }
grep -q 'BEGIN PUBLIC KEY' "$PUBKEY" || { echo "build.sh: $PUBKEY is not a PEM public key" >&2; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/dicomesh-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
START=$(date +%s)
step() { echo "build.sh [$ARCH, $(( $(date +%s) - START )) s]: $*"; }

# The gateway's wheelhouse for the target: our wheel (built from a copy of the work tree, so
# the repository gets no build/ or egg-info) plus binary wheels of the dependencies for that
# platform (glibc <= 2.36 = bookworm; every dependency has x86_64 and aarch64 wheels).
step "wheelhouse"
WHEELS="$WORK/wheels"
mkdir -p "$WORK/src"
# Tracked and new files, not ignored ones; a tracked file deleted in the tree is skipped.
(cd "$REPO" && git ls-files -z -co --exclude-standard \
    | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -C "$WORK/src" -xf -
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" "$WORK/src"
# pip does not widen an explicit --platform to older glibc tags itself: list them all.
PLATFORMS="--platform manylinux2014_$MACHINE"
for minor in $(seq 17 36); do PLATFORMS="$PLATFORMS --platform manylinux_2_${minor}_$MACHINE"; done
# shellcheck disable=SC2086 # word splitting of PLATFORMS is wanted
"$PYTHON" -m pip download --quiet --only-binary=:all: $PLATFORMS \
    --python-version 3.11 --implementation cp --dest "$WHEELS" "$WHEELS"/dicomesh-*.whl

# Debian packages only; --variant=important keeps the base small but usable for an admin.
# The hooks run in the finished tree with /dev, /proc and /sys mounted by mmdebstrap.
step "mmdebstrap $SUITE"
ROOT="$WORK/root"
mmdebstrap --quiet --variant=important --architectures="$ARCH" \
    --components=main,contrib,non-free-firmware \
    --include="$KERNEL,systemd-sysv,systemd-resolved,systemd-timesyncd,udev,dbus,\
initramfs-tools,python3,python3-venv,wireguard-tools,wireguard-go,iproute2,nftables,\
openssh-server,ca-certificates,dcmtk,cloud-guest-utils,gdisk,fdisk" \
    --customize-hook='cp -a "'"$HERE"'/overlay/." "$1/"' \
    --customize-hook='chroot "$1" update-initramfs -u -k all' \
    --customize-hook='install -m 0644 "'"$PUBKEY"'" "$1/etc/dicomesh/update.pub"' \
    --customize-hook='mkdir -p "$1/tmp/wheels" && cp "'"$WHEELS"'"/*.whl "$1/tmp/wheels/"' \
    --customize-hook='chroot "$1" python3 -m venv /opt/dicomesh/slots/a' \
    --customize-hook='chroot "$1" /opt/dicomesh/slots/a/bin/pip install --quiet --no-index \
        --no-cache-dir --find-links /tmp/wheels dicomesh && rm -rf "$1/tmp/wheels"' \
    --customize-hook='ln -s slots/a "$1/opt/dicomesh/current"' \
    --customize-hook='cp "'"$REPO"'"/systemd/*.service "'"$REPO"'"/systemd/*.path \
        "$1/etc/systemd/system/"' \
    --customize-hook='chroot "$1" systemd-sysusers' \
    --customize-hook='chroot "$1" systemctl enable dicomesh.service dicomesh-firstboot.service \
        dicomesh-update.path dicomesh-update-recover.service dicomesh-grow-state.service \
        systemd-networkd systemd-resolved' \
    --customize-hook='chroot "$1" passwd --lock root' \
    --customize-hook='echo wireguard > "$1/etc/modules-load.d/wireguard.conf"' \
    "$SUITE" "$ROOT" "$MIRROR"

# What mmdebstrap leaves from the build host or for a writable root.
step "per-device files out, read-only root in"
rm -f "$ROOT"/etc/ssh/ssh_host_* "$ROOT/var/lib/dbus/machine-id"
: > "$ROOT/etc/machine-id"   # empty: systemd makes a transient one at every boot
echo dicomesh > "$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdicomesh\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    > "$ROOT/etc/hosts"
ln -sf ../run/systemd/resolve/stub-resolv.conf "$ROOT/etc/resolv.conf"
# agetty(8) reads /run/issue.d only when there is no /etc/issue, and Debian ships one: the
# first boot's setup code (written to /run/issue.d, appliance/firmware/firstboot.py) reaches
# the console login prompt through /etc/issue.d.
ln -s ../run/issue.d "$ROOT/etc/issue.d"
rm -rf "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/lib/apt/lists/* "$ROOT"/tmp/* "$ROOT"/var/tmp/*

# Split the tree: what changes goes to the state partition, the rest is the read-only root.
STATE="$WORK/state"; BOOT="$WORK/boot"
mkdir -p "$STATE/var" "$STATE/opt" "$BOOT"
mv "$ROOT/var/lib" "$ROOT/var/log" "$STATE/var/" && mkdir "$ROOT/var/lib" "$ROOT/var/log"
mv "$ROOT/opt/dicomesh" "$STATE/opt/" && mkdir "$ROOT/opt/dicomesh" "$ROOT/data"
cp -L "$ROOT/vmlinuz" "$BOOT/vmlinuz" && cp -L "$ROOT/initrd.img" "$BOOT/initrd.img"
CMDLINE="root=LABEL=dm-root ro rootwait quiet"
if [ "$ARCH" = amd64 ]; then
    mkdir -p "$BOOT/EFI/BOOT" "$BOOT/loader/entries"
    cp "$ROOT/usr/lib/systemd/boot/efi/systemd-bootx64.efi" "$BOOT/EFI/BOOT/BOOTX64.EFI"
    printf 'timeout 0\ndefault dicomesh.conf\n' > "$BOOT/loader/loader.conf"
    printf 'title dicomesh\nlinux /vmlinuz\ninitrd /initrd.img\noptions %s console=tty0 console=ttyS0,115200\n' \
        "$CMDLINE" > "$BOOT/loader/entries/dicomesh.conf"
else
    cp -r "$ROOT/usr/lib/raspi-firmware/." "$BOOT/"
    cp "$ROOT"/usr/lib/linux-image-*/broadcom/bcm2711-rpi-4-b.dtb \
       "$ROOT"/usr/lib/linux-image-*/broadcom/bcm2712-rpi-5-b.dtb "$BOOT/" 2>/dev/null || true
    printf 'arm_64bit=1\nkernel=vmlinuz\ninitramfs initrd.img followkernel\nenable_uart=1\n' \
        > "$BOOT/config.txt"
    echo "$CMDLINE console=serial0,115200 console=tty1" > "$BOOT/cmdline.txt"
fi

# File systems without mounting anything.
step "file systems"
truncate -s 256M "$WORK/boot.img" && mkfs.vfat -n DM-BOOT "$WORK/boot.img" >/dev/null
mcopy -s -i "$WORK/boot.img" "$BOOT"/* ::/
mke2fs -q -t ext4 -L dm-root -d "$ROOT" "$WORK/root.img" 2G
mke2fs -q -t ext4 -L dm-state -d "$STATE" "$WORK/state.img" 1G

# The disk: partitions at fixed 1 MiB-aligned offsets, filled with dd.
step "disk"
DISK="$OUT/dicomesh-$ARCH.raw"
rm -f "$DISK"
truncate -s $((1 + 256 + 2048 + 1024 + 1))M "$DISK"
if [ "$ARCH" = amd64 ]; then LABEL=gpt; ESP=U; LINUX=L; else LABEL=dos; ESP=c; LINUX=83; fi
sfdisk --quiet "$DISK" <<PARTS
label: $LABEL
start=1MiB, size=256MiB, type=$ESP
size=2GiB, type=$LINUX
size=1GiB, type=$LINUX
PARTS
dd if="$WORK/boot.img" of="$DISK" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$WORK/root.img" of="$DISK" bs=1M seek=257 conv=notrunc,sparse status=none
dd if="$WORK/state.img" of="$DISK" bs=1M seek=2305 conv=notrunc,sparse status=none
if [ "$ARCH" = amd64 ]; then
    qemu-img convert -c -f raw -O qcow2 "$DISK" "$OUT/dicomesh-$ARCH.qcow2"
fi
step "built $DISK"
