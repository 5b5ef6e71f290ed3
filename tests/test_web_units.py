"""The admin page's pure parts: sessions, CSRF, login throttle, password file, config
section, log buffer. No sockets; the time is passed in."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.schema import ConfigError
from appliance.web.auth import SCRYPT_N, Account, AuthError
from appliance.web.logbuffer import LogBuffer
from appliance.web.sessions import LoginThrottle, SessionStore, csrf_ok
from appliance.web.uplinks import UplinkRates, interface_counters


def test_session_lifetime_idle_and_absolute() -> None:
    store = SessionStore(ttl_s=100, idle_s=10)
    s = store.create("127.0.0.1", now=0)
    assert store.get(s.token, 5) is s
    assert store.get(s.token, 14) is s  # used at 5: idle clock restarted
    assert store.get(s.token, 25) is None  # idle 11 s
    s2 = store.create("127.0.0.1", now=0)
    for t in range(9, 100, 9):
        assert store.get(s2.token, t) is s2
    assert store.get(s2.token, 100) is None  # absolute lifetime, however busy
    assert store.get("forged", 1) is None and store.get(None, 1) is None


def test_alive_does_not_count_as_use() -> None:
    store = SessionStore(ttl_s=100, idle_s=10)
    s = store.create("a", now=0)
    assert store.alive(s.token, 9)
    assert not store.alive(s.token, 10)  # a live stream does not keep an idle session open


def test_session_tokens_are_random_and_bounded() -> None:
    store = SessionStore(ttl_s=100, idle_s=100)
    tokens = {store.create("a", now=0).token for _ in range(200)}
    assert len(tokens) == 200 and all(len(t) >= 40 for t in tokens)
    assert len(store) == 64


def test_csrf_compare() -> None:
    s = SessionStore(10, 10).create("a", 0)
    assert csrf_ok(s, s.csrf)
    assert not csrf_ok(s, None)
    assert not csrf_ok(s, s.csrf[:-1])
    assert not csrf_ok(s, s.token)


def test_throttle_doubles_then_caps_and_clears() -> None:
    t = LoginThrottle(free=2, base_s=1, cap_s=5)
    assert [t.failed("x", 0) for _ in range(2)] == [0, 0]
    assert t.failed("x", 0) == 1
    assert t.retry_after("x", 0.5) == pytest.approx(0.5)
    assert t.failed("x", 1) == 2
    assert t.failed("x", 3) == 4
    assert t.failed("x", 7) == 5  # capped
    assert t.retry_after("y", 7) == 0  # per source address
    t.succeeded("x")
    assert t.retry_after("x", 7) == 0


def test_throttle_map_is_bounded() -> None:
    t = LoginThrottle(free=0, base_s=1, cap_s=5)
    for i in range(5000):
        t.failed(f"10.0.{i // 256}.{i % 256}", 0)
    assert len(t._by_source) == 4096


def test_account_setup_code_then_password(tmp_path: Path) -> None:
    account = Account(tmp_path)
    code = account.ensure_setup_code()
    assert code is not None
    assert account.ensure_setup_code() is None  # made once, logged once
    assert stat.S_IMODE(account.code_path.stat().st_mode) == 0o600
    with pytest.raises(AuthError, match="wrong code"):
        account.setup("AAAA-AAAA-AAAA", "long enough password")
    with pytest.raises(AuthError, match="at least 10"):
        account.setup(code, "short")
    account.setup(code.lower().replace("-", " "), "long enough password")  # typed loosely
    assert not account.code_path.exists()
    assert stat.S_IMODE(account.account_path.stat().st_mode) == 0o600
    stored = json.loads(account.account_path.read_text())
    assert stored["kdf"] == "scrypt" and stored["n"] == SCRYPT_N
    assert "long enough" not in account.account_path.read_text()
    fresh = Account(tmp_path)  # as after a restart
    assert fresh.verify("long enough password")
    assert not fresh.verify("long enough passwore")
    with pytest.raises(AuthError, match="already set up"):
        fresh.setup(code, "another long password")
    fresh.change("long enough password", "another long password")
    assert Account(tmp_path).verify("another long password")


def test_damaged_account_file_stays_locked(tmp_path: Path) -> None:
    (tmp_path / "web-admin.json").write_text("{not json")
    account = Account(tmp_path)
    assert account.configured  # no way in through setup either
    assert not account.verify("")
    assert account.ensure_setup_code() is None


def test_web_config_section_errors_name_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[web]\nlisten = ["0.0.0.0", "bad"]\nport = 0\nsession_idle_s = 1e9\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, {"state_dir": str(tmp_path)})
    text = str(err.value)
    assert "web.listen[0]: must be one LAN, loopback or overlay address" in text
    assert "web.listen[1]: must be an IPv4 or IPv6 address" in text
    assert "web.port: must be 1-65535" in text
    cfg = load_config(None, {"state_dir": str(tmp_path)})
    assert cfg.web.listen == ["127.0.0.1"] and cfg.web.port == 8080 and cfg.web.enabled


def test_log_buffer_filters_and_bounds() -> None:
    buf = LogBuffer(capacity=5)
    logger = logging.getLogger("test.web.buffer")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(buf)
    try:
        for i in range(8):
            logger.info("line %d", i)
        logger.warning("disk %s", "slow")
    finally:
        logger.removeHandler(buf)
    lines = buf.recent()
    assert [line.message for line in lines] == ["line 4", "line 5", "line 6", "line 7", "disk slow"]
    assert [line.message for line in buf.recent(level="warning")] == ["disk slow"]
    assert [line.message for line in buf.recent(contains="LINE 6")] == ["line 6"]
    assert [line.message for line in buf.recent(after=lines[-2].seq)] == ["disk slow"]


# /proc/net/dev, columns squeezed (the parser splits on blanks)
PROC_NET_DEV = """Inter-| Receive | Transmit
 face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop ...
 lo: 1000 10 0 0 0 0 0 0 1000 10 0 0 0 0 0 0
 eth1: 5000000 4000 0 0 0 0 0 0 250000 900 0 0 0 0 0 0
"""


def _net_status() -> dict:
    return {"routing": True, "uplinks": [
        {"name": "adsl1", "interface": "eth1", "state": "degraded", "rtt_ms": 42.5,
         "loss": 0.25, "up_kbps": 800, "down_kbps": 3000},
        {"name": "adsl2", "interface": "eth9", "state": "down", "rtt_ms": None, "loss": None,
         "up_kbps": 800, "down_kbps": 3000},
    ]}  # fmt: skip


def test_uplink_counters_and_rates() -> None:
    assert interface_counters(PROC_NET_DEV)["eth1"] == (5_000_000, 250_000)
    now = [100.0]
    rates = UplinkRates(clock=lambda: now[0])
    first = _net_status()
    rates.add(first, PROC_NET_DEV)
    assert first["uplinks"][0]["rx_bytes"] == 5_000_000 and first["uplinks"][0]["down_bps"] is None
    assert first["uplinks"][1]["rx_bytes"] is None  # its interface is not there
    now[0] = 102.0
    later = PROC_NET_DEV.replace("5000000", "5750000").replace("250000", "275000")
    second = _net_status()
    rates.add(second, later)
    assert second["uplinks"][0]["down_bps"] == 750_000 * 8 / 2
    assert second["uplinks"][0]["up_bps"] == 25_000 * 8 / 2


def test_uplink_metrics() -> None:
    from types import SimpleNamespace

    from prometheus_client.parser import text_string_to_metric_families

    from appliance.web import metrics

    net = _net_status()
    UplinkRates().add(net, PROC_NET_DEV)
    parts = SimpleNamespace(started_at=0.0, store=None, dicom=None, mesh=None)
    text = metrics.render(parts, {"sends_done": 2}, net).decode()  # type: ignore[arg-type]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip
    assert samples[("dicomesh_uplink_up", (("uplink", "adsl1"),))] == 1
    assert samples[("dicomesh_uplink_up", (("uplink", "adsl2"),))] == 0
    assert samples[("dicomesh_uplink_state", (("state", "degraded"), ("uplink", "adsl1")))] == 1
    assert samples[("dicomesh_uplink_state", (("state", "up"), ("uplink", "adsl1")))] == 0
    assert samples[("dicomesh_uplink_rtt_seconds", (("uplink", "adsl1"),))] == 0.0425
    assert samples[("dicomesh_uplink_loss_ratio", (("uplink", "adsl1"),))] == 0.25
    assert samples[("dicomesh_uplink_received_bytes_total", (("uplink", "adsl1"),))] == 5e6
    assert samples[("dicomesh_uplink_sent_bytes_total", (("uplink", "adsl1"),))] == 250_000
    assert ("dicomesh_uplink_received_bytes_total", (("uplink", "adsl2"),)) not in samples
    assert (
        samples[("dicomesh_uplink_capacity_bps", (("direction", "up"), ("uplink", "adsl1")))] == 8e5
    )
    assert samples[("dicomesh_dicom_sends", (("state", "done"),))] == 2
    assert "dicomesh_uplink_up" not in metrics.render(parts, {}, None).decode()  # type: ignore[arg-type]


def test_dicom_txt_record_keys() -> None:
    """PS3.15 Annex H.2 keys (AET, PrimaryDeviceType) and those OsiriX/Horos read."""
    from appliance.web.discovery import Advert, dicom_txt

    txt = dicom_txt(Advert(" CT_GW ", 104, 8080, "clinic-a", "clinic", "10.90.1.1", 7480))
    assert txt == {"txtvers": "1", "AET": "CT_GW", "PrimaryDeviceType": "ARCHIVE",
                   "AETitle": "CT_GW", "serverDescription": "dicomesh clinic-a",
                   "CGET": "YES"}  # fmt: skip


def test_push_job_progress() -> None:
    from appliance.dicom.push import PushJob

    job = PushJob("s1", "1.2.3", "WS1", started_at=0.0)
    job.total, job.completed, job.failed, job.bytes_sent = 10, 3, 1, 4000
    shown = job.to_json()
    assert shown["remaining"] == 6 and not shown["finished"] and shown["eta_s"] is not None
    job.finished, job.finished_at = True, 10.0
    assert job.to_json()["eta_s"] is None and job.to_json()["rate_bps"] == 0.0


def test_cli_peer_add_admin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import base64
    import os

    from appliance.cli import main
    from appliance.mesh.peers import read_peers

    key = base64.b64encode(os.urandom(32)).decode()
    base = ["peer", "--state-dir", str(tmp_path), "add"]
    assert main([*base, "site-a", "--key", key, "--address", "10.90.1.1", "--admin"]) == 0
    assert "admin" in capsys.readouterr().out
    other = base64.b64encode(os.urandom(32)).decode()
    assert main([*base, "site-b", "--key", other, "--address", "10.90.2.1"]) == 0
    peers = {p.name: p.admin for p in read_peers(tmp_path / "peers.toml")}
    assert peers == {"site-a": True, "site-b": False}
    assert main(["peer", "--state-dir", str(tmp_path), "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[-2].endswith("\tadmin") and not listed[-1].endswith("admin")


def _router_routes(tmp_path: Path) -> set[str]:
    """Every route of the page's app as "METHOD /path", built as the firmware builds it."""
    from types import SimpleNamespace

    from appliance.web.server import WebServer

    cfg = load_config(None, {"state_dir": str(tmp_path)})
    parts = SimpleNamespace(cfg=cfg, config_path=tmp_path / "c.toml", started_at=0.0,
                            store=None, mesh=None, dicom=None, net=None,
                            evictor=None)  # fmt: skip
    server = WebServer(cfg.web, parts)  # type: ignore[arg-type]
    server.logs.uninstall()
    found = set()
    for route in server.app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource else {}
        prefix = info.get("prefix", "").rstrip("/") + "/*"  # the static files
        path = info.get("path") or info.get("formatter") or prefix
        found.add(f"{route.method} {path}")
    return found


def test_api_md_documents_every_route_and_no_other(tmp_path: Path) -> None:
    import re

    from appliance.web import server

    doc = (Path(server.__file__).parent / "API.md").read_text()
    documented = set(re.findall(r"`((?:GET|POST|PUT|DELETE) /[^`\s]*)`", doc))
    routes = _router_routes(tmp_path)
    assert len(routes) >= 30
    assert routes - documented == set(), "routes missing from API.md"
    assert documented - routes == set(), "API.md documents routes that do not exist"


def test_page_never_listens_on_an_uplink_address() -> None:
    from appliance.web.server import on_uplinks

    status = {"uplinks": [{"name": "adsl1", "source": "192.168.1.20"},
                          {"name": "adsl2", "source": None}]}  # fmt: skip
    listen = ["127.0.0.1", "192.168.1.20", "10.0.0.1"]
    assert on_uplinks(listen, status) == {"192.168.1.20"}
    assert on_uplinks(listen, None) == set()  # no network manager: nothing to compare


def test_settings_write_section_keeps_the_rest_atomically(tmp_path: Path) -> None:
    import tomllib

    from appliance.dicom.config import DicomConfig
    from appliance.web import settings

    path = tmp_path / "dicomesh.toml"
    path.write_text('state_dir = "/srv/x"\n[mesh]\nname = "site-a"\n[dicom]\nport = 104\n')
    new = settings.validate_section(DicomConfig, "dicom", {"ae_title": "NEW_AE", "port": 11112})
    settings.check_whole(path, "dicom", new)
    settings.write_section(path, "dicom", new)
    data = tomllib.loads(path.read_text())
    assert data["state_dir"] == "/srv/x" and data["mesh"] == {"name": "site-a"}
    assert data["dicom"]["ae_title"] == "NEW_AE" and data["dicom"]["port"] == 11112
    assert load_config(path).dicom == new  # the file reads back to what was applied
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dicomesh.toml.lock", "dicomesh.toml"]
    with pytest.raises(ConfigError) as err:
        settings.validate_section(DicomConfig, "dicom", {"ae_title": "", "port": "x", "nope": 1})
    named = {e.split(":")[0] for e in err.value.errors}
    assert named == {"dicom.ae_title", "dicom.port", "dicom.nope"}
    # A file that no longer parses is reported, not overwritten with a guess.
    path.write_text("[dicom\n")
    with pytest.raises(ConfigError, match=r"dicomesh\.toml"):
        settings.write_section(path, "dicom", new)
    assert path.read_text() == "[dicom\n"


def _guarded(guard: object, method: str, path: str, source: str, arrived_on: str, **kw: object):
    """Run one request through the guard's middlewares; the handler's answer or the refusal."""
    import asyncio
    from unittest import mock

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    transport = mock.Mock()
    transport.get_extra_info = lambda key, default=None: {
        "peername": (source, 40000), "sockname": (arrived_on, 8080)
    }.get(key, default)  # fmt: skip

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="reached")

    async def run() -> int:
        request = make_mocked_request(method, path, transport=transport, **kw)
        chain = handler
        for middleware in reversed(guard.middlewares()):  # type: ignore[attr-defined]
            chain = (lambda m, h: lambda r: m(r, h))(middleware, chain)
        try:
            return (await chain(request)).status
        except web.HTTPException as exc:
            return exc.status

    return asyncio.run(run())


def test_remote_admin_only_for_admin_peers_identity_from_the_source_address() -> None:
    """On the overlay (mesh.address 10.90.1.1): an admin peer reaches the login, a plain
    peer or an unknown overlay source is refused before any login, whatever its headers
    say; LAN sources are not affected. /metrics is open to admin peers without a session."""
    import base64
    import os
    from types import SimpleNamespace

    from appliance.mesh.peers import Peer
    from appliance.web.config import WebConfig
    from appliance.web.guard import Guard

    def peer(name: str, address: str, admin: bool) -> Peer:
        key = base64.b64encode(os.urandom(32)).decode()
        return Peer(name=name, public_key=key, addresses=[address], admin=admin)

    peers = {p.addresses[0]: p for p in (peer("plain", "10.90.2.1", False),
                                          peer("boss", "10.90.3.1", True))}  # fmt: skip
    registry = SimpleNamespace(by_address=lambda a: peers.get(a))
    guard = Guard(WebConfig(), SessionStore(100, 100), lambda: registry, "10.90.1.1")  # type: ignore[arg-type]
    overlay, lan = "10.90.1.1", "192.168.1.5"
    assert _guarded(guard, "GET", "/api/session", "10.90.3.1", overlay) == 200
    assert _guarded(guard, "GET", "/api/status", "10.90.3.1", overlay) == 401  # then a login
    assert _guarded(guard, "GET", "/metrics", "10.90.3.1", overlay) == 200  # fleet scraper
    assert _guarded(guard, "GET", "/api/session", "10.90.2.1", overlay) == 403
    assert _guarded(guard, "GET", "/api/session", "10.90.9.9", overlay) == 403  # not admitted
    assert _guarded(guard, "GET", "/metrics", "10.90.2.1", overlay) == 403
    spoofed = {"headers": {"X-Forwarded-For": "10.90.3.1", "X-Real-IP": "10.90.3.1"}}
    assert _guarded(guard, "GET", "/api/session", "10.90.2.1", overlay, **spoofed) == 403
    # A peer's address is its identity wherever the request arrives (the page on the LAN).
    assert _guarded(guard, "GET", "/api/session", "10.90.2.1", lan) == 403
    assert _guarded(guard, "GET", "/api/session", "192.168.1.30", lan) == 200
    assert _guarded(guard, "GET", "/metrics", "192.168.1.30", lan) == 401  # not in metrics_allow
    assert _guarded(guard, "GET", "/", "192.168.1.30", lan) == 302
    assert guard.refused == 5
