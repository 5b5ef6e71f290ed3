"""First boot (appliance/firmware/firstboot.py) on temp directories: per-device secrets are
made once, with tight modes, and a second run (a reboot before the stamp) changes nothing."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from appliance.config import ConfigError
from appliance.firmware import firstboot


def factory(tmp_path: Path, **extra: object) -> Path:
    config = {
        "web": {"port": 8443},
        "net": {
            "uplinks": [
                {"name": "adsl1", "interface": "eth1", "gateway": "dhcp",
                 "up_kbps": 800, "down_kbps": 3000},
                {"name": "adsl2", "interface": "eth2", "gateway": "dhcp",
                 "up_kbps": 800, "down_kbps": 3000},
            ]
        },
        **extra,
    }  # fmt: skip
    path = tmp_path / "etc" / "dicomesh.toml"
    path.parent.mkdir()
    path.write_text(tomli_w.dumps(config))
    return path


def run(tmp_path: Path, factory_config: Path | None) -> firstboot.FirstBoot:
    machine_id = tmp_path / "machine-id"
    if not machine_id.exists():
        machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    return firstboot.first_boot(
        tmp_path / "state",
        factory_config=factory_config,
        ssh_key_dir=tmp_path / "ssh",
        system_dir=tmp_path / "system",
        issue_dir=tmp_path / "issue.d",
        etc_machine_id=machine_id,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_boot_makes_device_secrets(tmp_path: Path) -> None:
    done = run(tmp_path, factory(tmp_path))
    state = tmp_path / "state"
    assert done.config_copied
    assert (state / "dicomesh.toml").read_bytes() == (tmp_path / "etc/dicomesh.toml").read_bytes()
    assert done.wireguard_keys == ["adsl1", "adsl2"]
    for name in ("adsl1", "adsl2"):
        assert mode(state / "wireguard" / f"{name}.key") == 0o600
    assert done.setup_code_made
    code = (state / "setup-code").read_text().strip()
    assert mode(state / "setup-code") == 0o600
    issue = (tmp_path / "issue.d" / firstboot.ISSUE_FILE).read_text()
    assert code in issue and ":8443/" in issue
    assert (tmp_path / "system" / "machine-id").read_text() == "0123456789abcdef" * 2 + "\n"
    if shutil.which("ssh-keygen"):
        assert done.ssh_keys == ["ed25519", "rsa"]
        assert mode(tmp_path / "ssh" / "ssh_host_ed25519_key") == 0o600
    assert (state / firstboot.STAMP).exists()


def test_second_run_keeps_everything(tmp_path: Path) -> None:
    run(tmp_path, factory(tmp_path))
    state = tmp_path / "state"
    files = ["setup-code", "wireguard/adsl1.key", "dicomesh.toml"]
    before = {name: (state / name).read_bytes() for name in files}
    ssh_before = sorted(p.read_bytes() for p in (tmp_path / "ssh").glob("*_key"))
    done = run(tmp_path, None)  # the factory file is copied once only anyway
    assert done == firstboot.FirstBoot(wireguard_keys=["adsl1", "adsl2"])
    assert {name: (state / name).read_bytes() for name in files} == before
    assert sorted(p.read_bytes() for p in (tmp_path / "ssh").glob("*_key")) == ssh_before


def test_uninitialized_machine_id_is_not_saved(tmp_path: Path) -> None:
    (tmp_path / "machine-id").write_text("uninitialized\n")
    done = run(tmp_path, None)
    assert not done.machine_id_saved and not (tmp_path / "system" / "machine-id").exists()
    # No factory config: built-in defaults, no uplinks, still a setup code.
    assert done.wireguard_keys == [] and done.setup_code_made


def test_broken_factory_config_is_reported(tmp_path: Path) -> None:
    path = factory(tmp_path, dicom={"port": 70000})
    with pytest.raises(ConfigError, match="port"):
        run(tmp_path, path)
    assert not (tmp_path / "state" / firstboot.STAMP).exists()
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.firmware.firstboot", "--state-dir",
         str(tmp_path / "state"), "--factory-config", str(path),
         "--issue-dir", str(tmp_path / "issue.d")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "dicom.port" in proc.stderr, proc.stderr
