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
# Needs (build host, Debian 12): mmdebstrap, e2fsprogs (mke2fs -d), dosfstools, mtools,
# fdisk (sfdisk), qemu-utils (qemu-img); for arm64 on x86 also qemu-user-static +
# binfmt-support (mmdebstrap runs the foreign chroot through binfmt). No root, no loop
# devices: file systems are filled with `mke2fs -d` / `mcopy` and put together with dd.
#
# Layout (GPT on x86, MBR on the Pi whose firmware needs it):
#   1 boot   vfat  256 MiB   ESP with systemd-boot (x86) / Pi firmware, kernel, initrd
#   2 root   ext4  2 GiB     mounted read-only (LABEL=dm-root)
#   3 state  ext4  1 GiB     /data: /var/lib, /var/log, /opt/dicomesh (A/B slots)
#                            (growing it to the whole disk on first boot is not done yet)
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
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

# The gateway's wheelhouse for the target: our wheel plus binary wheels of the dependencies
# for that platform (uvloop, lmdb, zstandard, cryptography have manylinux aarch64 wheels).
WHEELS="$WORK/wheels"
python3 -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" "$REPO"
if [ "$ARCH" = arm64 ]; then PLATFORM=manylinux2014_aarch64; else PLATFORM=manylinux2014_x86_64; fi
python3 -m pip download --quiet --only-binary=:all: --platform "$PLATFORM" \
    --python-version 3.11 --dest "$WHEELS" "$WHEELS"/dicomesh-*.whl

case "$ARCH" in
amd64) KERNEL="linux-image-amd64,systemd-boot-efi" ;;
arm64) KERNEL="linux-image-arm64,raspi-firmware" ;;
*) echo "unknown arch $ARCH" >&2; exit 2 ;;
esac

# Debian packages only; --variant=important keeps the base small but usable for an admin.
mmdebstrap --variant=important --architectures="$ARCH" \
    --components=main,contrib,non-free-firmware \
    --include="$KERNEL,systemd-sysv,systemd-resolved,systemd-timesyncd,udev,dbus,\
initramfs-tools,python3,python3-venv,wireguard-tools,wireguard-go,iproute2,nftables,\
openssh-server,ca-certificates,dcmtk" \
    --customize-hook='cp -a "'"$HERE"'/overlay/." "$1/"' \
    --customize-hook='install -m 0644 "'"$PUBKEY"'" "$1/etc/dicomesh/update.pub"' \
    --customize-hook='mkdir -p "$1/tmp/wheels" && cp "'"$WHEELS"'"/*.whl "$1/tmp/wheels/"' \
    --customize-hook='chroot "$1" python3 -m venv /opt/dicomesh/slots/a' \
    --customize-hook='chroot "$1" /opt/dicomesh/slots/a/bin/pip install --quiet --no-index \
        --find-links /tmp/wheels dicomesh && rm -rf "$1/tmp/wheels"' \
    --customize-hook='ln -s slots/a "$1/opt/dicomesh/current"' \
    --customize-hook='cp "'"$REPO"'"/systemd/*.service "'"$REPO"'"/systemd/*.path \
        "$1/etc/systemd/system/"' \
    --customize-hook='chroot "$1" systemd-sysusers' \
    --customize-hook='chroot "$1" systemctl enable dicomesh.service dicomesh-firstboot.service \
        dicomesh-update.path dicomesh-update-recover.service systemd-networkd systemd-resolved' \
    --customize-hook='chroot "$1" passwd --lock root' \
    --customize-hook='rm -f "$1"/etc/ssh/ssh_host_* && : > "$1/etc/machine-id"' \
    --customize-hook='echo wireguard > "$1/etc/modules-load.d/wireguard.conf"' \
    "$SUITE" "$WORK/rootfs.tar" "$MIRROR"

# Split the tree: what changes goes to the state partition, the rest is the read-only root.
ROOT="$WORK/root"; STATE="$WORK/state"; BOOT="$WORK/boot"
mkdir -p "$ROOT" "$STATE/var" "$STATE/opt" "$BOOT"
tar -C "$ROOT" -xf "$WORK/rootfs.tar"
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
truncate -s 256M "$WORK/boot.img" && mkfs.vfat -n DM-BOOT "$WORK/boot.img" >/dev/null
mcopy -s -i "$WORK/boot.img" "$BOOT"/* ::/
mke2fs -q -t ext4 -L dm-root -d "$ROOT" "$WORK/root.img" 2G
mke2fs -q -t ext4 -L dm-state -d "$STATE" "$WORK/state.img" 1G

# The disk: partitions at fixed 1 MiB-aligned offsets, filled with dd.
DISK="$OUT/dicomesh-$ARCH.raw"
truncate -s $((1 + 256 + 2048 + 1024 + 1))M "$DISK"
if [ "$ARCH" = amd64 ]; then LABEL=gpt; ESP=U; LINUX=L; else LABEL=dos; ESP=c; LINUX=83; fi
sfdisk --quiet "$DISK" <<PARTS
label: $LABEL
start=1MiB, size=256MiB, type=$ESP
size=2GiB, type=$LINUX
size=1GiB, type=$LINUX
PARTS
dd if="$WORK/boot.img" of="$DISK" bs=1M seek=1 conv=notrunc status=none
dd if="$WORK/root.img" of="$DISK" bs=1M seek=257 conv=notrunc status=none
dd if="$WORK/state.img" of="$DISK" bs=1M seek=2305 conv=notrunc status=none
if [ "$ARCH" = amd64 ]; then
    qemu-img convert -f raw -O qcow2 "$DISK" "$OUT/dicomesh-$ARCH.qcow2"
fi
echo "built $DISK"
