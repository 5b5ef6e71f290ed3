"""[net] config, peer endpoints/tunnel keys in the registry, WireGuard key files, `dicomesh net`."""

from __future__ import annotations

import base64
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.config import load_config, render_toml
from appliance.mesh import peers
from appliance.net import keys
from appliance.schema import ConfigError

K = [base64.b64encode(bytes([i]) * 32).decode() for i in range(1, 5)]

UPLINKS = """\
[[net.uplinks]]
name = "adsl1"
interface = "eth1"
gateway = "192.168.1.1"
up_kbps = 800
down_kbps = 3000
overlay_address = "10.90.1.1"
[[net.uplinks]]
name = "adsl2"
interface = "eth2"
gateway = "dhcp"
up_kbps = 800
down_kbps = 3000
overlay_address = "10.90.1.2"
[net.uplinks.shape]
enabled = true
[net.health]
targets = ["192.0.2.1", "192.0.2.2:443"]
interval_s = 2
down_after = 3
up_after = 5
[net.wireguard]
enabled = true
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dicomesh.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, text))
    return excinfo.value.errors


def test_default_is_routing_off() -> None:
    cfg = load_config(None)
    assert cfg.net.uplinks == [] and not cfg.net.wireguard.enabled


def test_contract_example_loads_and_round_trips(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, UPLINKS))
    assert [u.gateway for u in cfg.net.uplinks] == ["192.168.1.1", "dhcp"]
    assert cfg.net.uplinks[1].shape.enabled and cfg.net.uplinks[1].shaped_kbps() == 760
    assert cfg.net.health.down_after == 3 and cfg.net.wireguard.backend == "auto"
    again = load_config(write(tmp_path, render_toml(cfg)))
    assert again == cfg


def test_every_net_error_is_reported_with_its_key_path(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """\
        [[net.uplinks]]
        name = "ADSL 1"
        interface = "eth1"
        gateway = "192.168.1.300"
        up_kbps = 0
        down_kbps = 3000
        [[net.uplinks]]
        name = "b"
        interface = "eth1"
        gateway = "dhcp"
        up_kbps = 800
        down_kbps = 3000
        overlay_address = "10.1.1.1"
        [net.health]
        interval_s = 1
        timeout_s = 2
        [net.wireguard]
        enabled = true
        backend = "kernal"
        """,
    )
    text = "\n".join(errors)
    for expected in (
        "net.uplinks[0].name: must be 1-15 characters",
        'net.uplinks[0].gateway: must be an IPv4 address or "dhcp"',
        "net.uplinks[0].up_kbps: must be 1-10000000",
        "net.wireguard.backend: expected one of 'auto', 'kernel', 'userspace'",
        "net.health.timeout_s: must be <= interval_s (one probe at a time per uplink)",
    ):
        assert expected in text, text
    # Cross-field checks run once the fields themselves are valid.
    errors = errors_of(
        tmp_path,
        """\
        [[net.uplinks]]
        name = "a"
        interface = "eth1"
        gateway = "dhcp"
        up_kbps = 800
        down_kbps = 3000
        [[net.uplinks]]
        name = "b"
        interface = "eth1"
        gateway = "dhcp"
        up_kbps = 800
        down_kbps = 3000
        overlay_address = "10.1.1.1"
        [net.wireguard]
        enabled = true
        """,
    )
    assert "net.uplinks[1].interface: 'eth1' used by another uplink" in errors
    assert "net.uplinks[0].overlay_address: required with WireGuard" in errors
    assert "net.uplinks[1].overlay_address: must be inside 10.90.0.0/16" in errors
    errors = errors_of(tmp_path, '[net.health]\ntargets = ["192.0.2.1:99999", "host"]\n')
    assert [e.split(":")[0] for e in errors] == ["net.health.targets[0]", "net.health.targets[1]"]


def test_peer_with_tunnels_and_endpoints(tmp_path: Path) -> None:
    path = tmp_path / peers.PEERS_FILE
    peer = peers.peer_from_args(
        name="site-b",
        public_key=K[0],
        tunnel_keys=[K[1]],
        addresses=["10.90.2.1", "10.90.2.2"],
        endpoints=["203.0.113.1:51820", "b.example.org:51821"],
    )
    peers.add_peer(path, peer)
    assert peers.read_peers(path) == [peer]
    assert peer.public_keys == K[:2]
    old_style = peers.peer_from_args(name="old", public_key=K[2], addresses=["10.90.3.1"])
    assert old_style.endpoints == [] and old_style.tunnel_keys == []


def test_peer_tunnel_checks() -> None:
    with pytest.raises(ConfigError) as excinfo:
        peers.peer_from_args(name="x", public_key=K[0], addresses=["10.90.2.1"], endpoints=["h"])
    assert excinfo.value.errors == [
        'peer.endpoints[0]: must be "host:port" (the WireGuard UDP endpoint of one of its uplinks)'
    ]
    bad = peers.PeersFile(
        [
            peers.Peer("a", K[0], ["10.90.2.1"], tunnel_keys=[K[1]]),
            peers.Peer("b", K[1], ["10.90.3.1"]),
        ]
    )
    assert ("peers[0].addresses", "one address per tunnel key (2 keys)") in bad.validate()
    assert ("peers[1].public_key", f"public_key {K[1]!r} already admitted") in bad.validate()


def test_keys_are_kept_0600_and_never_shown(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    pair = keys.load_or_create(tmp_path, "adsl1")
    path = keys.key_path(tmp_path, "adsl1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert keys.load_or_create(tmp_path, "adsl1") == pair  # kept, not regenerated
    assert keys.public_key(tmp_path, "adsl1") == pair.public_b64
    secret = base64.b64encode(pair.private).decode()
    assert secret not in repr(pair) and pair.private.hex() not in repr(pair)
    assert secret not in caplog.text
    os.chmod(path, 0o644)
    keys.load_or_create(tmp_path, "adsl1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_net_keys_command_prints_public_keys_and_the_admission_line(tmp_path: Path) -> None:
    cfg = write(
        tmp_path, f'state_dir = "{tmp_path / "state"}"\n[mesh]\nname = "clinic-a"\n' + UPLINKS
    )
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "net", "--config", str(cfg), "keys"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    state = tmp_path / "state"
    pub = [keys.public_key(state, n) for n in ("adsl1", "adsl2")]
    assert all(pub) and all(p in done.stdout for p in pub)
    private = keys.key_path(state, "adsl1").read_text().strip()
    assert private not in done.stdout
    assert f"dicomesh peer add clinic-a --role clinic --key {pub[0]}" in done.stdout
    assert "--endpoint <public address of eth1>:51820" in done.stdout
