"""Sample /proc and /sys trees of the boards in hw/, built in a temp directory the way the
kernel lays them out: /sys/class/* entries are relative symlinks into /sys/devices, so
`realpath` shows which bus a NIC or disk hangs on, as on the device."""

from __future__ import annotations

import os
from pathlib import Path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def link(path: Path, target: Path) -> None:
    """A relative symlink `path` -> `target`, like sysfs's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(os.path.relpath(target, path.parent))


def nic(
    root: Path,
    name: str,
    device: str,
    driver: str | None,
    *,
    wireless: bool = False,
    virtual: bool = False,
    arp_type: int = 1,
) -> None:
    """/sys/class/net/<name> for a NIC whose device directory is sys/devices/<device>."""
    if virtual:
        node = root / "sys/devices/virtual/net" / name
    else:
        dev = root / "sys/devices" / device
        node = dev / "net" / name
        link(node / "device", dev)
        if driver:
            drv = root / "sys/bus" / ("usb" if "/usb" in device else "platform") / "drivers"
            (drv / driver).mkdir(parents=True, exist_ok=True)
            link(dev / "driver", drv / driver)
    write(node / "type", f"{arp_type}\n")
    write(node / "address", "dc:a6:32:00:00:01\n")
    if wireless:
        (node / "wireless").mkdir()
    link(root / "sys/class/net" / name, node)


def disk(root: Path, name: str, device: str, sectors: int, removable: int = 0) -> None:
    dev = root / "sys/devices" / device
    node = dev / "block" / name
    dev.mkdir(parents=True, exist_ok=True)
    link(node / "device", dev)
    write(node / "size", f"{sectors}\n")
    write(node / "removable", f"{removable}\n")
    link(root / "sys/block" / name, node)


def led(root: Path, name: str, triggers: str = "none [mmc0] timer heartbeat") -> Path:
    node = root / "sys/devices/platform/leds/leds" / name
    write(node / "trigger", triggers + "\n")
    write(node / "brightness", "0\n")
    write(node / "max_brightness", "255\n")
    link(root / "sys/class/leds" / name, node)
    return root / "sys/class/leds" / name


def watchdog(root: Path, identity: str, max_timeout: int) -> None:
    node = root / "sys/class/watchdog/watchdog0"
    write(node / "identity", identity + "\n")
    write(node / "max_timeout", f"{max_timeout}\n")


def thermal(root: Path, millideg: int, critical: int | None = None) -> None:
    zone = root / "sys/class/thermal/thermal_zone0"
    write(zone / "type", "cpu-thermal\n")
    write(zone / "temp", f"{millideg}\n")
    if critical is not None:
        write(zone / "trip_point_0_type", "critical\n")
        write(zone / "trip_point_0_temp", f"{critical}\n")


SCB = "platform/scb"
PI4_USB = f"{SCB}/fd500000.pcie/pci0000:00/0000:00:00.0/0000:01:00.0/usb2"


def pi4(root: Path, *, usb_ssd: bool = True) -> Path:
    """A Pi 4 with its onboard NIC, a USB Ethernet adapter, Wi-Fi, a WireGuard link, the ACT
    LED, the bcm2835 watchdog, an SD card and (optionally) a USB SSD."""
    write(root / "proc/device-tree/model", "Raspberry Pi 4 Model B Rev 1.4\0")
    nic(root, "eth0", f"{SCB}/fd580000.ethernet", "bcmgenet")
    nic(root, "eth1", f"{PI4_USB}/2-1/2-1:1.0", "r8152")
    nic(root, "wlan0", f"{SCB}/fe300000.mmcnr/mmc_host/mmc1/mmc1:0001/mmc1:0001:1", "brcmfmac",
        wireless=True)  # fmt: skip
    nic(root, "wg0", "", None, virtual=True, arp_type=65534)
    led(root, "ACT")
    led(root, "PWR")
    watchdog(root, "Broadcom BCM2835 Watchdog timer", 15)
    thermal(root, 48_500, critical=110_000)
    disk(root, "mmcblk0", f"{SCB}/fe340000.mmc/mmc_host/mmc0/mmc0:aaaa", 62_333_952)
    disk(root, "mmcblk0boot0", f"{SCB}/fe340000.mmc/mmc_host/mmc0/mmc0:aaaa", 8192)
    disk(root, "loop0", "virtual/block", 1000)
    if usb_ssd:
        disk(root, "sda", f"{PI4_USB}/2-2/2-2:1.0/host0/target0:0:0/0:0:0:0", 976_773_168)
    return root


def pi5_sd_only(root: Path) -> Path:
    """A Pi 5 whose model is only in /sys/firmware/devicetree, with the store on its SD card."""
    write(root / "sys/firmware/devicetree/base/model", "Raspberry Pi 5 Model B Rev 1.0\0")
    rp1 = "platform/axi/1000120000.pcie/1f00100000.ethernet"
    nic(root, "eth0", rp1, "macb")
    nic(root, "eth1", "platform/axi/1000120000.pcie/1f00200000.usb/usb1/1-1/1-1:1.0", "ax88179")
    led(root, "ACT")
    disk(root, "mmcblk0", "platform/axi/1000fff000.mmc/mmc_host/mmc0/mmc0:59b4", 124_735_488)
    return root


def mini_pc(root: Path, temp_millideg: int = 45_000) -> Path:
    """An x86-64 mini-PC: DMI, two PCI NICs, a USB adapter, NVMe, an iTCO watchdog."""
    dmi = root / "sys/class/dmi/id"
    write(dmi / "sys_vendor", "Protectli\n")
    write(dmi / "product_name", "VP2410\n")
    write(dmi / "board_name", "VP2410\n")
    nic(root, "enp2s0", "pci0000:00/0000:00:1c.1/0000:02:00.0", "igb")
    nic(root, "enp1s0", "pci0000:00/0000:00:1c.0/0000:01:00.0", "igb")
    nic(root, "enx00e04c680001", "pci0000:00/0000:00:15.0/usb1/1-2/1-2:1.0", "r8152")
    watchdog(root, "iTCO_wdt", 613)
    thermal(root, temp_millideg)
    disk(root, "nvme0n1", "pci0000:00/0000:00:1d.0/0000:03:00.0/nvme/nvme0", 500_118_192)
    disk(root, "sda", "pci0000:00/0000:00:15.0/usb1/1-3/1-3:1.0/host1/target1:0:0/1:0:0:0",
         30_000_000, removable=1)  # fmt: skip
    return root
