"""Board detection and hardware facts (appliance/firmware/board.py) on sample /proc and /sys
trees of each profile in hw/ (tests/hwtree.py)."""

from __future__ import annotations

from pathlib import Path

import hwtree
import pytest

from appliance.config import load_config
from appliance.firmware import FirmwareError, board

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def profiles() -> dict[str, board.Profile]:
    return board.load_profiles(REPO / "hw")


def test_every_profile_loads(profiles: dict[str, board.Profile]) -> None:
    assert set(profiles) == {"rpi4", "rpi5", "x86_64"}
    for profile in profiles.values():
        # Profile defaults are real config keys with valid values.
        load_config(None, {"state_dir": "/tmp/x", **profile.defaults})
        load_config(None, {"state_dir": "/tmp/x", **profile.defaults_on_sd})
        assert profile.warn_c < profile.critical_c


def test_pi4(tmp_path: Path, profiles: dict[str, board.Profile]) -> None:
    hw = board.detect(hwtree.pi4(tmp_path), profiles)
    assert hw.profile is profiles["rpi4"]
    assert hw.identified_by == "Raspberry Pi 4 Model B Rev 1.4"
    assert hw.lan is not None and hw.lan.name == "eth0" and hw.lan.bus == "platform"
    # The USB adapter is an uplink; Wi-Fi and the WireGuard link are neither.
    assert [(n.name, n.bus, n.driver) for n in hw.uplinks] == [("eth1", "usb", "r8152")]
    assert hw.led == tmp_path / "sys/class/leds/ACT"
    assert hw.watchdog == board.Watchdog("/dev/watchdog0", "Broadcom BCM2835 Watchdog timer", 14)
    # USB SSD over the SD card; the eMMC boot area and loop devices are not disks.
    assert [d.name for d in board.list_disks(tmp_path)] == ["mmcblk0", "sda"]
    assert hw.store_disk is not None and (hw.store_disk.name, hw.store_disk.kind) == ("sda", "usb")
    assert not hw.store_on_sd
    assert hw.config_defaults() == {"dicom": {"max_associations": 16}}
    assert hw.thermal == [board.ThermalZone("thermal_zone0", "cpu-thermal", 48.5, 110.0)]
    assert board.thermal_state(hw.thermal, hw.profile) == "ok"


def test_pi4_without_ssd_keeps_the_store_on_sd(
    tmp_path: Path, profiles: dict[str, board.Profile]
) -> None:
    hw = board.detect(hwtree.pi4(tmp_path, usb_ssd=False), profiles)
    assert hw.store_disk is not None and hw.store_disk.kind == "mmc" and hw.store_on_sd
    defaults = hw.config_defaults()
    assert defaults["store"] == {"compression": "zstd", "min_free_bytes": "1 GiB"}


def test_pi5_from_sysfs_devicetree(tmp_path: Path, profiles: dict[str, board.Profile]) -> None:
    hw = board.detect(hwtree.pi5_sd_only(tmp_path), profiles)
    assert hw.profile is profiles["rpi5"]
    assert hw.lan is not None and (hw.lan.name, hw.lan.driver) == ("eth0", "macb")
    assert [n.name for n in hw.uplinks] == ["eth1"]
    assert hw.watchdog is None  # no watchdog in this tree
    assert hw.store_on_sd
    assert hw.config_defaults() == {
        "dicom": {"max_associations": 32},
        "store": {"compression": "zstd", "min_free_bytes": "1 GiB"},
    }


def test_mini_pc(tmp_path: Path, profiles: dict[str, board.Profile]) -> None:
    hw = board.detect(hwtree.mini_pc(tmp_path), profiles)
    assert hw.profile is profiles["x86_64"]
    assert hw.identified_by == "Protectli VP2410"
    # No fixed LAN name on x86: the first onboard NIC by name; the rest (USB too) uplinks.
    assert hw.lan is not None and hw.lan.name == "enp1s0"
    assert [(n.name, n.bus) for n in hw.uplinks] == [("enp2s0", "pci"), ("enx00e04c680001", "usb")]
    assert hw.led is None
    assert hw.watchdog is not None and hw.watchdog.runtime_s == 30
    assert hw.store_disk is not None and hw.store_disk.name == "nvme0n1"
    assert hw.config_defaults() == {}


@pytest.mark.parametrize(
    "millideg, expected", [(45_000, "ok"), (86_000, "warm"), (101_000, "critical")]
)
def test_thermal_limits(
    tmp_path: Path, profiles: dict[str, board.Profile], millideg: int, expected: str
) -> None:
    hw = board.detect(hwtree.mini_pc(tmp_path, millideg), profiles)
    assert board.thermal_state(hw.thermal, hw.profile) == expected


def test_kernel_trip_point_below_profile_limit(profiles: dict[str, board.Profile]) -> None:
    zone = board.ThermalZone("thermal_zone0", "cpu-thermal", 71.0, 70.0)
    assert board.thermal_state([zone], profiles["rpi4"]) == "critical"


def test_unknown_board(tmp_path: Path, profiles: dict[str, board.Profile]) -> None:
    hwtree.write(tmp_path / "proc/device-tree/model", "Pine64 RockPro64 v2.1\0")
    hwtree.nic(tmp_path, "eth0", "platform/fe300000.ethernet", "rk_gmac-dwmac")
    hw = board.detect(tmp_path, profiles)
    assert hw.profile is None and hw.identified_by == "Pine64 RockPro64 v2.1"
    assert hw.lan is not None and hw.lan.name == "eth0" and hw.uplinks == []
    assert hw.config_defaults() == {} and hw.led is None


def test_empty_root(tmp_path: Path, profiles: dict[str, board.Profile]) -> None:
    hw = board.detect(tmp_path, profiles)
    assert (hw.profile, hw.lan, hw.uplinks, hw.store_disk, hw.thermal) == (None, None, [], None, [])


def test_config_file_wins_over_board_defaults() -> None:
    defaults = {"dicom": {"max_associations": 16}, "store": {"compression": "zstd"}}
    data = {"store": {"compression": "off"}, "dicom": {"port": 104}}
    merged = board.merge_under(defaults, data)
    assert merged == {
        "dicom": {"max_associations": 16, "port": 104},
        "store": {"compression": "off"},
    }
    assert defaults["store"] == {"compression": "zstd"}  # not modified


def test_bad_profile_is_reported(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[board]\nid = "x"\n')
    with pytest.raises(FirmwareError, match=r"bad\.toml.*name"):
        board.load_profiles(tmp_path)
