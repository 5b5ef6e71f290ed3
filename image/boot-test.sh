#!/bin/sh
# Boot test of the x86-64 image under qemu (software emulation, no KVM needed): the gateway
# must answer C-ECHO on the forwarded DICOM port and serve its admin page.
#
#   image/boot-test.sh OUTDIR/dicomesh-amd64.qcow2
#
# Needs qemu-system-x86, ovmf, dcmtk (echoscu), curl. Boots a throwaway overlay of the image
# (the image itself stays pristine). Bounded: gives up after BOOT_TIMEOUT seconds (default
# 600; under TCG emulation on 2 cores a Debian boot takes minutes). Not run in CI.
set -eu
IMAGE=${1:?qcow2 image}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-600}
DICOM_PORT=${DICOM_PORT:-21112}
WEB_PORT=${WEB_PORT:-28080}
WORK=$(mktemp -d)
qemu-img create -q -f qcow2 -F qcow2 -b "$(realpath "$IMAGE")" "$WORK/overlay.qcow2"
cp /usr/share/OVMF/OVMF_VARS.fd "$WORK/vars.fd"
qemu-system-x86_64 -machine q35 -m 1024 -smp 2 -nographic \
    -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd \
    -drive if=pflash,format=raw,file="$WORK/vars.fd" \
    -drive file="$WORK/overlay.qcow2",if=virtio \
    -nic user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:$DICOM_PORT-:11112,hostfwd=tcp:127.0.0.1:$WEB_PORT-:8080 \
    -serial file:"$WORK/console.log" -monitor none -display none &
QEMU=$!
trap 'kill $QEMU 2>/dev/null; wait $QEMU 2>/dev/null; rm -rf "$WORK"' EXIT
START=$(date +%s)
until echoscu -to 5 -aec DICOMESH 127.0.0.1 "$DICOM_PORT" 2>/dev/null; do
    if [ $(( $(date +%s) - START )) -ge "$BOOT_TIMEOUT" ]; then
        echo "no C-ECHO answer within $BOOT_TIMEOUT s; console:" >&2
        tail -50 "$WORK/console.log" >&2
        exit 1
    fi
    sleep 5
done
ECHO_AT=$(( $(date +%s) - START ))
curl -fsS "http://127.0.0.1:$WEB_PORT/" >/dev/null
echo "C-ECHO after ${ECHO_AT} s; admin page served"
grep -o 'setup code: [A-Z0-9-]*' "$WORK/console.log" | head -1 || true
