"""First boot (systemd/dicomesh-firstboot.service): what must be unique per device is made on
the device, never in the image. Idempotent: each step keeps what already exists, so a run
interrupted by a power cut is simply repeated at the next boot (the stamp comes last)."""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import ConfigError, load_config
from appliance.fileutil import atomic_write

log = logging.getLogger(__name__)

STAMP = ".firstboot-done"
CONFIG_IN_STATE_DIR = "dicomesh.toml"  # the file `dicomesh run --state-dir` loads (cli.py)
ISSUE_FILE = "50-dicomesh.issue"
SSH_KEY_TYPES = ("ed25519", "rsa")
_MACHINE_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class FirstBoot:
    """What a run did (for the log line and the tests)."""

    config_copied: bool = False
    wireguard_keys: list[str] = field(default_factory=list)
    setup_code_made: bool = False
    ssh_keys: list[str] = field(default_factory=list)
    machine_id_saved: bool = False


def copy_factory_config(factory: Path | None, state_dir: Path) -> bool:
    """Copy the image's config into the state directory once, if it is valid there."""
    target = state_dir / CONFIG_IN_STATE_DIR
    if factory is None or not factory.is_file() or target.exists():
        return False
    # Validate as the gateway will load it; a broken factory file must not stop the boot:
    # the gateway then runs with built-in defaults and the admin page shows them.
    load_config(factory, {"state_dir": str(state_dir)})
    atomic_write(target, factory.read_bytes(), mode=0o600)
    return True


def make_wireguard_keys(state_dir: Path) -> list[str]:
    """One key pair per configured uplink tunnel; returns the uplink names."""
    from appliance.net import keys  # cryptography: only when there are uplinks to key

    path = state_dir / CONFIG_IN_STATE_DIR
    cfg = load_config(path if path.exists() else None, {"state_dir": str(state_dir)})
    for up in cfg.net.uplinks:
        keys.load_or_create(state_dir, up.name)
    return [up.name for up in cfg.net.uplinks]


def make_setup_code(state_dir: Path, issue_dir: Path | None, web_port: int) -> bool:
    """The admin page's one-time setup code, shown at the console login prompt."""
    from appliance.web.auth import Account

    account = Account(state_dir)
    made = account.ensure_setup_code() is not None
    if issue_dir is not None and account.code_path.exists():
        code = account.code_path.read_text().strip()
        issue_dir.mkdir(parents=True, exist_ok=True)
        # agetty(8) expands \4 to the machine's IPv4 address; /run/issue.d is volatile, so
        # the code is gone from the console once the boot ends (and void once used).
        atomic_write(
            issue_dir / ISSUE_FILE,
            f"dicomesh admin page: http://\\4:{web_port}/  setup code: {code}\n\n".encode(),
            mode=0o644,
        )
    return made


def make_ssh_host_keys(key_dir: Path, keygen: str | None = None) -> list[str]:
    """sshd host keys on the state partition (the image ships none)."""
    keygen = keygen or shutil.which("ssh-keygen")
    if keygen is None:
        return []
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    made = []
    for kind in SSH_KEY_TYPES:
        key = key_dir / f"ssh_host_{kind}_key"
        if key.exists():
            continue
        key.with_suffix(".pub").unlink(missing_ok=True)
        subprocess.run(
            [keygen, "-q", "-t", kind, "-N", "", "-C", "", "-f", str(key)],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        made.append(kind)
    return made


def save_machine_id(etc_machine_id: Path, system_dir: Path) -> bool:
    """Keep the id systemd made at this boot, so it survives the read-only root."""
    target = system_dir / "machine-id"
    if target.exists():
        return False
    try:
        current = etc_machine_id.read_text().strip()
    except OSError:
        return False
    if not _MACHINE_ID.match(current):  # "uninitialized" or empty: nothing to keep yet
        return False
    system_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(target, (current + "\n").encode(), mode=0o444)
    return True


def first_boot(
    state_dir: Path,
    *,
    factory_config: Path | None = None,
    ssh_key_dir: Path | None = None,
    system_dir: Path | None = None,
    issue_dir: Path | None = None,
    etc_machine_id: Path = Path("/etc/machine-id"),
) -> FirstBoot:
    """Every first-boot step, then the stamp; raises ConfigError on a broken factory config."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    done = FirstBoot()
    done.config_copied = copy_factory_config(factory_config, state_dir)
    done.wireguard_keys = make_wireguard_keys(state_dir)
    path = state_dir / CONFIG_IN_STATE_DIR
    cfg = load_config(path if path.exists() else None, {"state_dir": str(state_dir)})
    done.setup_code_made = make_setup_code(state_dir, issue_dir, cfg.web.port)
    if ssh_key_dir is not None:
        done.ssh_keys = make_ssh_host_keys(ssh_key_dir)
    if system_dir is not None:
        done.machine_id_saved = save_machine_id(etc_machine_id, system_dir)
    atomic_write(state_dir / STAMP, b"", mode=0o600)
    return done


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicomesh-firstboot", description=__doc__)
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--factory-config", type=Path)
    p.add_argument("--ssh-key-dir", type=Path)
    p.add_argument("--system-dir", type=Path)
    p.add_argument("--issue-dir", type=Path, default=Path("/run/issue.d"))
    return p


def main(argv: list[str] | None = None) -> int:
    """`dicomesh-firstboot` entry point."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        done = first_boot(
            args.state_dir.resolve(),
            factory_config=args.factory_config,
            ssh_key_dir=args.ssh_key_dir,
            system_dir=args.system_dir,
            issue_dir=args.issue_dir,
        )
    except ConfigError as exc:
        print(f"dicomesh-firstboot: invalid factory configuration:\n{exc}", file=sys.stderr)
        return 2
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"dicomesh-firstboot: {exc}", file=sys.stderr)
        return 1
    # No secret in this line: key names and booleans only (the setup code is on the console).
    log.info(
        "first boot done: config copied %s, wireguard keys %s, setup code %s, ssh keys %s, "
        "machine-id saved %s",
        done.config_copied, done.wireguard_keys or "none", done.setup_code_made,
        done.ssh_keys or "none", done.machine_id_saved,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
