#!/bin/sh
# Boot test of the x86-64 image under qemu: the gateway must answer C-ECHO on the forwarded
# DICOM port and serve its admin page on the forwarded web port.
#
#   image/boot-test.sh OUTDIR/dicomesh-amd64.qcow2
#
# Needs qemu-system-x86, qemu-utils, ovmf, dcmtk (echoscu), curl, python3, e2fsprogs
# (dumpe2fs, debugfs). Boots a throwaway qcow2 overlay of the image (the image itself stays
# pristine), GROW (default 1G) larger than the image, twice; KEEP=DIR keeps the overlay and
# the serial console logs in DIR. Software emulation (TCG) unless ACCEL=kvm. Bounded: each
# boot gives up after BOOT_TIMEOUT seconds (default 600). Checks: C-ECHO, the admin page on
# the LAN NIC's address, the setup code on the serial console, no block written to the root
# partition (read-only root), the state file system grown to the end of the larger disk,
# and at the second boot the machine-id first boot saved restored (one journal directory).
# Not run in CI.
set -eu
IMAGE=${1:?qcow2 image}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-600}
DICOM_PORT=${DICOM_PORT:-21112}
WEB_PORT=${WEB_PORT:-28080}
OVMF=${OVMF:-/usr/share/OVMF}

missing=""
for tool in qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils echoscu:dcmtk curl:curl python3:python3 \
        dumpe2fs:e2fsprogs debugfs:e2fsprogs; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing="$missing ${tool%%:*} [${tool#*:}]"
done
[ -r "$OVMF/OVMF_CODE_4M.fd" ] || missing="$missing $OVMF/OVMF_CODE_4M.fd [ovmf]"
if [ -n "$missing" ]; then echo "boot-test.sh: missing:$missing" >&2; exit 2; fi

if [ -n "${KEEP:-}" ]; then WORK=$KEEP; mkdir -p "$WORK"; else WORK=$(mktemp -d); fi
# TCG by default: it runs anywhere. ACCEL=kvm where /dev/kvm works (on the nested-KVM build
# VM this was measured on, OVMF died with "KVM internal error ... emulation failure").
ACCEL=${ACCEL:-tcg}
# arch-capabilities off: nested KVM hosts may refuse that MSR ("failed to set MSR 0x10a").
if [ "$ACCEL" = kvm ]; then CPU=${CPU:-host,-arch-capabilities}; else CPU=${CPU:-max}; fi
GROW=${GROW:-1G}
rm -f "$WORK/overlay.qcow2" "$WORK"/console*.log
qemu-img create -q -f qcow2 -F qcow2 -b "$(realpath "$IMAGE")" "$WORK/overlay.qcow2"
# A disk larger than the image, as an SD card or SSD is: the state partition must grow.
qemu-img resize -q "$WORK/overlay.qcow2" "+$GROW"
cp "$OVMF/OVMF_VARS_4M.fd" "$WORK/vars.fd"
QEMU=""
cleanup() {
    [ -z "$QEMU" ] || { kill "$QEMU" 2>/dev/null || true; wait "$QEMU" 2>/dev/null || true; }
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# boot N: start qemu on the overlay (console in console-N.log), wait for C-ECHO.
boot() {
    CONSOLE="$WORK/console-$1.log"
    START=$(date +%s)
    # One NIC, the LAN one: qemu's user networking hands it 10.0.2.15 by DHCP; the factory
    # config (image/overlay/etc/dicomesh/dicomesh.toml) puts the admin page on "lan".
    qemu-system-x86_64 -accel "$ACCEL" -cpu "$CPU" -machine q35 -m 1024 -smp 2 \
        -drive if=pflash,format=raw,readonly=on,file="$OVMF/OVMF_CODE_4M.fd" \
        -drive if=pflash,format=raw,file="$WORK/vars.fd" \
        -drive file="$WORK/overlay.qcow2",if=virtio \
        -nic user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:$DICOM_PORT-:11112,hostfwd=tcp:127.0.0.1:$WEB_PORT-:8080 \
        -qmp unix:"$WORK/qmp.sock",server=on,wait=off \
        -serial file:"$CONSOLE" -monitor none -display none -nodefaults &
    QEMU=$!
    echo "boot-test.sh: boot $1 of $IMAGE ($ACCEL), up to $BOOT_TIMEOUT s"
    until echoscu -to 5 -aec DICOMESH 127.0.0.1 "$DICOM_PORT" 2>/dev/null; do
        if ! kill -0 "$QEMU" 2>/dev/null; then
            echo "boot-test.sh: qemu exited; console:" >&2; tail -50 "$CONSOLE" >&2; exit 1
        fi
        if [ $(( $(date +%s) - START )) -ge "$BOOT_TIMEOUT" ]; then
            echo "boot-test.sh: no C-ECHO answer within $BOOT_TIMEOUT s; console:" >&2
            tail -50 "$CONSOLE" >&2
            exit 1
        fi
        sleep 2
    done
    ECHO_AT=$(( $(date +%s) - START ))
    echo "boot-test.sh: boot $1: C-ECHO answered ${ECHO_AT} s after qemu started"
}

# Clean shutdown (ACPI power button over QMP), so the state partition is written out; qemu
# is killed if the guest has not powered off within 120 s.
poweroff() {
    python3 - "$WORK/qmp.sock" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()  # greeting
for cmd in ("qmp_capabilities", "system_powerdown"):
    f.write(json.dumps({"execute": cmd}) + "\n"); f.flush()
    while "return" not in json.loads(f.readline()):
        pass
PY
    waited=0
    while kill -0 "$QEMU" 2>/dev/null && [ "$waited" -lt 120 ]; do sleep 1; waited=$((waited + 1)); done
    if kill -0 "$QEMU" 2>/dev/null; then
        echo "boot-test.sh: guest did not power off within 120 s; killed" >&2
        kill "$QEMU"
    fi
    wait "$QEMU" 2>/dev/null || true
    QEMU=""
    echo "boot-test.sh: powered off after ${waited} s"
}

# The state partition (3, from 2305 MiB to the end of the disk) as a sparse raw file.
state_fs() {
    size=$(qemu-img info --output=json "$WORK/overlay.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
    offset=$((2305 * 1048576))
    rm -f "$WORK/state.raw"
    qemu-img convert -O raw \
        "json:{\"driver\":\"raw\",\"offset\":$offset,\"size\":$((size - offset - 1048576)),\"file\":{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"$WORK/overlay.qcow2\"}}}" \
        "$WORK/state.raw"
}

ACCEL_START=$(date +%s)
boot 1
# The page may come up a moment after the DICOM port (READY=1 is sent once DICOM is bound).
# "/" redirects to the setup/login page on a new gateway: follow it.
tries=0
until curl -fsSL -o "$WORK/page.html" "http://127.0.0.1:$WEB_PORT/"; do
    tries=$((tries + 1))
    if [ "$tries" -ge 30 ]; then
        echo "boot-test.sh: admin page not served on port $WEB_PORT" >&2; exit 1
    fi
    sleep 2
done
PAGE_AT=$(( $(date +%s) - START ))
grep -qi dicomesh "$WORK/page.html" \
    || { echo "boot-test.sh: port $WEB_PORT answered, but not with the admin page" >&2; exit 1; }
echo "boot-test.sh: admin page served ${PAGE_AT} s after qemu started ($(wc -c < "$WORK/page.html") bytes)"
# agetty shows /run/issue.d on the serial console: the one-time setup code of first boot.
tries=0
until grep -q 'setup code: ' "$CONSOLE"; do
    tries=$((tries + 1))
    if [ "$tries" -ge 30 ]; then
        echo "boot-test.sh: setup code not shown on the serial console" >&2; exit 1
    fi
    sleep 2
done
echo "boot-test.sh: setup code shown on the serial console"
poweroff
# Read-only root: the overlay holds every block the guest wrote; none may fall in partition 2.
python3 - "$WORK/overlay.qcow2" <<'PY'
import json, subprocess, sys
MIB = 1 << 20
parts = {"boot": (1, 257), "root": (257, 2305), "state": (2305, 3329)}  # build.sh layout
extents = json.loads(subprocess.run(
    ["qemu-img", "map", "--output=json", sys.argv[1]], check=True, capture_output=True).stdout)
written = dict.fromkeys(parts, 0)
for e in extents:
    if e["depth"] == 0 and e["data"]:
        for name, (a, b) in parts.items():
            written[name] += max(0, min(b * MIB, e["start"] + e["length"]) - max(a * MIB, e["start"]))
print("boot-test.sh: written by the guest: " + ", ".join(f"{k} {v // 1024} KiB" for k, v in written.items()))
if written["root"]:
    sys.exit("boot-test.sh: the guest wrote to the root partition: it is not read-only")
PY
# The state file system fills the larger disk (dicomesh-grow-state.service).
state_fs
blocks=$(dumpe2fs -h "$WORK/state.raw" 2>/dev/null | sed -n 's/^Block count: *//p')
bsize=$(dumpe2fs -h "$WORK/state.raw" 2>/dev/null | sed -n 's/^Block size: *//p')
fs_mib=$((blocks * bsize / 1048576))
room_mib=$(( $(stat -c %s "$WORK/state.raw") / 1048576 ))
echo "boot-test.sh: state file system ${fs_mib} MiB, its partition may span ${room_mib} MiB"
[ "$fs_mib" -ge $((room_mib - 8)) ] && [ "$fs_mib" -gt 1100 ] \
    || { echo "boot-test.sh: the state file system was not grown to the disk" >&2; exit 1; }
saved=$(debugfs -R "cat /var/lib/dicomesh-system/machine-id" "$WORK/state.raw" 2>/dev/null | tr -d '\n')
echo "$saved" | grep -Eq '^[0-9a-f]{32}$' \
    || { echo "boot-test.sh: first boot saved no machine-id ($saved)" >&2; exit 1; }

# Second boot of the same disk: the saved machine-id is restored before PID 1 starts.
boot 2
poweroff
grep -q 'machine-id restored from the state partition' "$CONSOLE" \
    || { echo "boot-test.sh: the initramfs did not restore the machine-id" >&2; exit 1; }
state_fs
journals=$(debugfs -R "ls /var/log/journal" "$WORK/state.raw" 2>/dev/null | tr -s ' \t' '\n' \
    | grep -E '^[0-9a-f]{32}$' | sort -u)
echo "boot-test.sh: machine-id $saved; journal directories: $(echo $journals)"
[ "$journals" = "$saved" ] \
    || { echo "boot-test.sh: the machine-id changed across the reboot" >&2; exit 1; }
rm -f "$WORK/state.raw"
echo "boot-test.sh: whole test $(( $(date +%s) - ACCEL_START )) s"
[ -z "${KEEP:-}" ] || echo "boot-test.sh: overlay and console logs kept in $WORK"
echo "boot-test.sh: passed"
