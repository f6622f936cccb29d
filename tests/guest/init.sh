#!/bin/busybox sh
# /init of the donor_app tiny guest. Prints "tick N UPTIME" to the serial console every
# donor.interval_ms (default 50) so a host can prove the guest kept its state across
# pause, save/restore and migration (N never goes backwards). donor.mode=burn adds a
# busy loop that keeps the vCPU at 100 %; donor.mode=sleep (default) stays idle.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
# devtmpfs provides /dev/ttyS0; without it the console writes go nowhere.
mount -t devtmpfs dev /dev
# Order matters: each module needs the ones before it.
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_balloon; do
    insmod "/lib/modules/$m.ko"
done
mode=sleep
interval_ms=50
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        donor.mode=*) mode="${arg#donor.mode=}" ;;
        donor.interval_ms=*) interval_ms="${arg#donor.interval_ms=}" ;;
    esac
done
exec >/dev/ttyS0 2>&1
echo "donor-guest ready mode=$mode interval_ms=$interval_ms"
if [ "$mode" = burn ]; then
    (while :; do :; done) &
fi
n=0
while :; do
    n=$((n + 1))
    read -r up _ </proc/uptime
    echo "tick $n $up"
    usleep $((interval_ms * 1000))
done
