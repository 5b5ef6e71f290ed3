"""`web.listen = ["lan"]`: the admin page on the addresses of the board's LAN NIC. A real
gateway runs in a throwaway network namespace whose veth interface carries the name the
sample board tree (tests/hwtree.py, a mini-PC) gives its LAN NIC; the page must answer on
that interface's address, on one it gains later (a DHCP lease), and nowhere else."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import hwtree
import pytest
from gateway import Gateway
from lab import FAMILY, _cmd, delete_namespaces

from appliance.config import ConfigError, load_config

LAN_NIC = "enp1s0"  # what tests/hwtree.py's mini-PC has as its first onboard NIC
FIRST, LATER = "10.77.5.1", "10.77.6.1"


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"{FAMILY}{secrets.token_hex(3)}-web"
    _cmd(f"ip netns add {name}")
    try:
        _cmd(f"ip -n {name} link set lo up")
        # A veth pair (this kernel may lack the dummy driver); its far end stays unused.
        _cmd(f"ip -n {name} link add {LAN_NIC} type veth peer name {LAN_NIC}-far")
        _cmd(f"ip -n {name} link set {LAN_NIC} up")
        _cmd(f"ip -n {name} addr add {FIRST}/24 dev {LAN_NIC}")
        yield name
    finally:
        assert delete_namespaces([name]) == []


def status_in(ns: str, url: str) -> int | str:
    """GET `url` from inside `ns`: the HTTP status, or the connection error's name."""
    code = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        f"    print(urllib.request.urlopen({url!r}, timeout=5).status)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code)\n"
        "except OSError as e:\n"
        "    print(type(getattr(e, 'reason', e)).__name__)\n"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "python3", "-c", code],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    out = done.stdout.strip()
    return int(out) if out.isdigit() else out


def test_page_listens_on_the_boards_lan_nic(
    gateway_factory: Callable[..., Gateway], netns: str, tmp_path: Path
) -> None:
    root = hwtree.mini_pc(tmp_path / "hw")
    gw = gateway_factory(start=False, web={"listen": ["lan"]})
    gw.start(netns=netns, env={"DICOMESH_HW_ROOT": str(root)})
    port = gw.web_port
    assert f"admin page on http://{FIRST}:{port}/" in gw.log()
    assert status_in(netns, f"http://{FIRST}:{port}/login") == 200
    # Only the LAN NIC's address: not loopback (nor any other) unless listed too.
    assert status_in(netns, f"http://127.0.0.1:{port}/login") == "ConnectionRefusedError"

    # An address the NIC gains later (DHCP) is served within the poll period (10 s).
    _cmd(f"ip -n {netns} addr add {LATER}/24 dev {LAN_NIC}")
    deadline = time.monotonic() + 30
    while f"admin page now also on http://{LATER}:{port}/" not in gw.log():
        assert time.monotonic() < deadline, gw.log()[-2000:]
        time.sleep(0.2)
    assert status_in(netns, f"http://{LATER}:{port}/login") == 200
    assert gw.stop() == 0


def test_lan_keyword_is_the_only_name_accepted(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[web]\nlisten = ["lan", "127.0.0.1"]\n')
    assert load_config(good).web.listen == ["lan", "127.0.0.1"]
    for bad in ('"eth0"', '"LAN"', '"0.0.0.0"'):
        path = tmp_path / "bad.toml"
        path.write_text(f"[web]\nlisten = [{bad}]\n")
        with pytest.raises(ConfigError, match=r"web\.listen"):
            load_config(path)
