"""The admin page's API on a real `dicomesh run` subprocess on loopback: first-boot setup,
login/logout, throttling, CSRF, every route behind a session, settings written to the
config file and applied, peers in peers.toml, live events, metrics, search, diagnostics,
remote admin restricted to admin peers."""

from __future__ import annotations

import base64
import io
import os
import stat
import tarfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from dcmtk import StoreSCP, storescu
from gateway import Gateway
from procs import free_port
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from studygen import DEFAULT_PATIENT, SeriesInfo
from webkit import PASSWORD, WebClient, first_sse_event

from appliance import __version__
from appliance.config import load_config
from appliance.mesh.peers import read_peers
from appliance.web.guard import is_public
from appliance.web.server import WebServer

FAST_EVENTS = {"events_interval_s": 0.2}
LOGIN_REQUIRED = b'{"error": "login required"}'


def _base(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.web_port}"


def _setup_code(gw: Gateway) -> str:
    return (gw.state_dir / "setup-code").read_text().strip()


@pytest.fixture
def admin(gateway_factory: Callable[..., Gateway]) -> tuple[Gateway, WebClient]:
    """A gateway whose admin password is set, and a logged-in client."""
    gw = gateway_factory(web=FAST_EVENTS)
    client = WebClient(_base(gw))
    assert client.setup(_setup_code(gw)).status == 200
    return gw, client


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def test_first_boot_setup_flow(gateway_factory: Callable[..., Gateway]) -> None:
    gw = gateway_factory()
    code_file = gw.state_dir / "setup-code"
    assert stat.S_IMODE(code_file.stat().st_mode) == 0o600
    code = code_file.read_text().strip()
    assert gw.log().count(code) == 1  # logged once, at first boot
    client = WebClient(_base(gw))
    assert client.get("/api/session").json() == {"authenticated": False, "setup_required": True}
    assert client.post("/api/login", {"password": PASSWORD}).status == 409
    wrong = client.setup("ZZZZ-ZZZZ-ZZZZ")
    assert wrong.status == 401 and wrong.json()["error"] == "wrong setup code"
    short = client.setup(code, "short")
    assert short.status == 400 and "password" in short.json()["error"]
    ok = client.setup(code)
    assert ok.status == 200
    cookie = ok.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP on the LAN unless web.cookie_secure
    assert not code_file.exists()
    account = gw.state_dir / "web-admin.json"
    assert stat.S_IMODE(account.stat().st_mode) == 0o600
    assert PASSWORD not in account.read_text() and '"kdf": "scrypt"' in account.read_text()
    assert client.get("/api/status").status == 200
    again = WebClient(_base(gw)).setup(code)
    assert again.status == 400 and "already set up" in again.json()["error"]
    # A restart does not make a new code once the password is set.
    gw.stop()
    gw.start()
    assert not code_file.exists()
    assert WebClient(_base(gw)).get("/api/session").json()["setup_required"] is False


def test_login_logout(admin: tuple[Gateway, WebClient]) -> None:
    gw, _ = admin
    client = WebClient(_base(gw))
    assert client.get("/api/status").status == 401
    bad = client.login("not the password")
    assert bad.status == 401 and bad.json()["error"] == "wrong password"
    assert client.login().status == 200
    session = client.get("/api/session").json()
    assert session["authenticated"] and session["csrf"] == client.csrf
    assert client.get("/api/status").status == 200
    assert client.post("/api/logout").status == 200
    assert client.get("/api/status").status == 401
    assert client.get("/api/session").json()["authenticated"] is False
    assert "failed password" in gw.log() and PASSWORD not in gw.log()


def test_login_throttling_per_source(gateway_factory: Callable[..., Gateway]) -> None:
    gw = gateway_factory(web={"login_free_attempts": 2, "login_backoff_s": 1.0})
    WebClient(_base(gw)).setup(_setup_code(gw))
    attacker = WebClient(_base(gw))
    assert [attacker.login("guess").status for _ in range(2)] == [401, 401]
    third = attacker.login("guess")
    assert third.status == 401 and third.json()["retry_after"] == 1
    locked = attacker.login()  # even the right password waits out the lockout
    assert locked.status == 429 and locked.headers["Retry-After"] == "1"
    other = WebClient(_base(gw), source="127.0.0.3")  # another address is not locked out
    assert other.login().status == 200
    time.sleep(1.1)
    fourth = attacker.login("guess")
    assert fourth.status == 401 and fourth.json()["retry_after"] == 2  # doubled
    time.sleep(2.1)
    assert attacker.login().status == 200
    assert attacker.login("guess").status == 401  # success cleared the count...
    assert attacker.login("guess").json()["retry_after"] == 0  # ...free attempts again


def test_csrf_and_cross_site_requests_refused(admin: tuple[Gateway, WebClient]) -> None:
    gw, client = admin
    peer = {"name": "site-b", "public_key": _key(), "addresses": ["10.90.2.1"]}
    no_token = client.post("/api/peers", peer, csrf=False)
    assert no_token.status == 403 and "CSRF" in no_token.json()["error"]
    wrong = client.post("/api/peers", peer, csrf=False, headers={"X-CSRF-Token": "x" * 43})
    assert wrong.status == 403
    form = client.post("/api/peers", peer, content_type="application/x-www-form-urlencoded")
    assert form.status == 415
    foreign = client.post("/api/peers", peer, headers={"Origin": "http://evil.example"})
    assert foreign.status == 403
    assert client.post("/api/logout", csrf=False).status == 403
    assert read_peers(gw.state_dir / "peers.toml") == []
    same = client.post("/api/peers", peer, headers={"Origin": _base(gw)})
    assert same.status == 201


def _routes(tmp_path: Path) -> list[tuple[str, str]]:
    """Every route of the page's app, as built by the firmware itself."""
    cfg = load_config(None, {"state_dir": str(tmp_path)})
    parts = SimpleNamespace(cfg=cfg, config_path=tmp_path / "c.toml", started_at=0.0,
                            store=None, mesh=None, dicom=None, net=None,
                            evictor=None)  # fmt: skip
    server = WebServer(cfg.web, parts)  # type: ignore[arg-type]
    server.logs.uninstall()
    found = []
    for route in server.app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or info.get("prefix", "")
        path = path.replace("{name}", "someone").replace("{filename}", "app.js")
        path = path.replace("{id}", "s1")
        if "prefix" in info:
            path = path.rstrip("/") + "/app.js"
        found.append((route.method, path))
    return found


def test_every_route_requires_a_session(admin: tuple[Gateway, WebClient], tmp_path: Path) -> None:
    gw, _ = admin
    anonymous = WebClient(_base(gw))
    routes = _routes(tmp_path)
    assert len(routes) >= 30
    checked = []
    for method, path in routes:
        reply = anonymous.request(method, path, {})
        if is_public(method, path):
            # Reached its handler (which may refuse on its own terms, e.g. a wrong password).
            assert reply.status != 302 and reply.body != LOGIN_REQUIRED, (method, path)
            continue
        if path == "/metrics":
            # Open to loopback scrapers by default (web.metrics_allow); see the remote test.
            assert reply.status == 200
            continue
        if path.startswith("/api/"):
            assert reply.status == 401, (method, path, reply)
            assert reply.json() == {"error": "login required"}
        else:
            assert reply.status == 302 and reply.headers["Location"] == "/login", (method, path)
        checked.append(path)
    assert "/api/status" in checked and "/" in checked and "/api/diagnostics" in checked
    for new in (
        "/api/sends",
        "/api/sends/s1",
        "/api/settings/store",
        "/api/settings/net",
        "/api/settings/evict",
        "/api/evict/plan",
        "/api/qos/simulate",
        "/api/qos/measure",
        "/api/qos/runs",
        "/api/qos/runs/s1",
        "/api/qos/report",
    ):
        assert new in checked, new


def test_dicom_settings_round_trip(admin: tuple[Gateway, WebClient]) -> None:
    gw, client = admin
    got = client.get("/api/settings/dicom").json()
    assert got["file"] == str(gw.config_path)
    settings = got["settings"]
    assert settings["ae_title"] == gw.ae_title
    settings["ae_title"] = "RENAMED"
    ws1 = {"ae_title": "WS1", "host": "127.0.0.1", "port": free_port()}  # nobody listens
    settings["nodes"] = [ws1]
    put = client.request("PUT", "/api/settings/dicom", settings)
    assert put.status == 200, put
    assert put.json()["restart_needed"] == []
    on_disk = tomllib.loads(gw.config_path.read_text())
    assert on_disk["dicom"]["ae_title"] == "RENAMED"
    assert on_disk["dicom"]["nodes"] == [ws1]
    assert on_disk["mesh"]["name"] == gw.mesh_name  # other tables untouched
    # Applied without a restart: the node now answers to the new called AE title only.
    assert _echo(gw, "RENAMED") == 0x0000
    assert _echo(gw, gw.ae_title) is None  # strict_called_ae: rejected
    echo = client.post("/api/dicom/echo", {"ae_title": "RENAMED"}).json()
    assert echo["ok"] and echo["status"] == "0x0000"
    unknown = client.post("/api/dicom/echo", {"ae_title": "NOBODY"})
    assert unknown.status == 404
    # The node's C-ECHO button: a known node that does not answer is reported, not an error.
    down = client.post("/api/dicom/echo", {"ae_title": "WS1"})
    assert down.status == 200 and down.json()["ok"] is False and down.json()["error"]
    # Calling AE titles apply to the next association too.
    only = client.request("PUT", "/api/settings/dicom", {**settings, "allowed_calling": ["PACS"]})
    assert only.status == 200, only
    assert _echo(gw, "RENAMED") is None  # TESTSCU is not allowed any more
    assert client.request("PUT", "/api/settings/dicom", settings).status == 200
    assert _echo(gw, "RENAMED") == 0x0000
    # A change of port is written but needs a restart, and says so.
    settings["port"] = settings["port"] + 1
    moved = client.request("PUT", "/api/settings/dicom", settings).json()
    assert moved["restart_needed"] == ["dicom.port"]
    assert client.get("/api/status").json()["restart_needed"] == ["dicom.port"]
    assert tomllib.loads(gw.config_path.read_text())["dicom"]["port"] == settings["port"]
    assert _echo(gw, "RENAMED") == 0x0000  # still listening where it started
    # Back to the port it listens on: nothing to restart for.
    settings["port"] = settings["port"] - 1
    back = client.request("PUT", "/api/settings/dicom", settings).json()
    assert back["restart_needed"] == []


def test_forwarding_follows_a_node_moved_on_the_page(
    gateway_factory: Callable[..., Gateway], small_series: SeriesInfo, tmp_path: Path
) -> None:
    """A forwarding job retrying toward a dead address reaches the node once the page gives
    the node its new port: no restart."""
    from forward_kit import destination, received, wait_until

    ws1 = {"ae_title": "WS1", "host": "127.0.0.1", "port": free_port()}
    gw = gateway_factory(dicom={"nodes": [ws1]}, forward={
        "rules": [{"name": "all", "destinations": ["WS1"]}],
        "backoff_base_s": 0.2, "backoff_max_s": 0.5, "poll_s": 0.1, "max_tries": 1000,
    })  # fmt: skip
    client = WebClient(_base(gw))
    assert client.setup(_setup_code(gw)).status == 200
    assert storescu(gw.host, gw.port, gw.ae_title, small_series.paths[:1]).ok
    port = free_port()
    out = tmp_path / "rx"
    with destination(port, out):
        time.sleep(1.0)  # retrying toward the old port meanwhile
        assert received(out) == []
        settings = client.get("/api/settings/dicom").json()["settings"]
        moved = client.request("PUT", "/api/settings/dicom",
                               {**settings, "nodes": [{**ws1, "port": port}]})  # fmt: skip
        assert moved.status == 200 and moved.json()["restart_needed"] == []
        wait_until(lambda: received(out) == small_series.sop_uids[:1], 20, "forwarded")


def test_settings_checked_with_the_whole_file(gateway_factory: Callable[..., Gateway]) -> None:
    """A section that is valid alone but breaks a rule across sections (a forwarding rule's
    destination must be a known node) is refused; nothing written, nothing applied."""
    ws1 = {"ae_title": "WS1", "host": "127.0.0.1", "port": free_port()}
    gw = gateway_factory(
        dicom={"nodes": [ws1]}, forward={"rules": [{"name": "all", "destinations": ["WS1"]}]}
    )
    client = WebClient(_base(gw))
    assert client.setup(_setup_code(gw)).status == 200
    before = gw.config_path.read_text()
    settings = client.get("/api/settings/dicom").json()["settings"]
    dropped = client.request("PUT", "/api/settings/dicom", {**settings, "nodes": [],
                                                            "ae_title": "GONE"})  # fmt: skip
    assert dropped.status == 400, dropped
    assert dropped.json()["errors"] == [
        "forward.rules[0].destinations[0]: 'WS1' is not in [[dicom.nodes]]"
    ]
    assert gw.config_path.read_text() == before
    assert _echo(gw, gw.ae_title) == 0x0000  # not applied either
    # Written atomically: a temp file beside it, renamed over it; none is left behind.
    renamed = client.request("PUT", "/api/settings/dicom", {**settings, "ae_title": "KEPT"})
    assert renamed.status == 200, renamed
    assert renamed.json()["restart_needed"] == []
    # A node added: C-MOVE, sends and forwarding see it at once.
    ws2 = {"ae_title": "WS2", "host": "127.0.0.1", "port": free_port()}
    more = client.request("PUT", "/api/settings/dicom", {**settings, "ae_title": "KEPT",
                                                         "nodes": [ws1, ws2]})  # fmt: skip
    assert more.status == 200 and more.json()["restart_needed"] == []
    assert load_config(gw.config_path).dicom.ae_title == "KEPT"
    assert sorted(p.name for p in gw.config_path.parent.glob(f".{gw.config_path.name}*")) == [
        f".{gw.config_path.name}.lock"
    ]


def _echo(gw: Gateway, called: str) -> int | None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(gw.host, gw.port, ae_title=called)
    try:
        if not assoc.is_established:
            return None
        status = assoc.send_c_echo()
        assoc.release()
        return int(status.Status)
    finally:
        ae.shutdown()


def test_settings_validation_names_the_field(admin: tuple[Gateway, WebClient]) -> None:
    gw, client = admin
    before = gw.config_path.read_text()
    bad = client.get("/api/settings/dicom").json()["settings"]
    bad.update(ae_title="WAY_TOO_LONG_AE_TITLE", port=70000, bogus=1)
    reply = client.request("PUT", "/api/settings/dicom", bad)
    assert reply.status == 400
    errors = reply.json()["errors"]
    assert any(e.startswith("dicom.ae_title: must be 1-16 characters") for e in errors)
    assert "dicom.port: must be 1-65535" in errors
    assert any(e.startswith("dicom.bogus: unknown key") for e in errors)
    assert gw.config_path.read_text() == before  # nothing written


def test_peers_admit_and_revoke_through_the_registry(admin: tuple[Gateway, WebClient]) -> None:
    gw, client = admin
    key = _key()
    reply = client.post("/api/peers", {"name": "site-b", "public_key": key,
                                       "addresses": ["10.90.2.1"], "role": "replica",
                                       "admin": True})  # fmt: skip
    assert reply.status == 201, reply
    [peer] = read_peers(gw.state_dir / "peers.toml")
    assert (peer.name, peer.public_key, peer.addresses, peer.role, peer.admin) == (
        "site-b", key, ["10.90.2.1"], "replica", True)  # fmt: skip
    listed = client.get("/api/peers").json()["peers"]
    assert [p["name"] for p in listed] == ["site-b"] and listed[0]["admin"] is True
    clash = client.post("/api/peers", {"name": "site-b", "public_key": _key(),
                                       "addresses": ["10.90.3.1"]})  # fmt: skip
    assert clash.status == 400 and any("already admitted" in e for e in clash.json()["errors"])
    invalid = client.post("/api/peers", {"name": "Bad Name", "public_key": "nope",
                                         "addresses": ["x"]})  # fmt: skip
    errors = invalid.json()["errors"]
    named = {e.split(":")[0] for e in errors}
    assert named >= {"peer.name", "peer.public_key", "peer.addresses[0]"}
    assert client.request("DELETE", "/api/peers/site-b").status == 200
    assert read_peers(gw.state_dir / "peers.toml") == []
    assert client.request("DELETE", "/api/peers/site-b").status == 404


def test_live_events_push_status(admin: tuple[Gateway, WebClient]) -> None:
    gw, client = admin
    cookie = client.cookie()
    assert cookie is not None
    name, data = first_sse_event(_base(gw), f"{cookie.name}={cookie.value}")
    assert name == "status"
    assert data["dicom"]["ae_title"] == gw.ae_title and "store" in data and "transfers" in data


def test_metrics_parse(admin: tuple[Gateway, WebClient], small_series: SeriesInfo) -> None:
    gw, client = admin
    storescu(gw.host, gw.port, gw.ae_title, small_series.paths)
    reply = client.get("/metrics")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}  # fmt: skip
    assert samples[("dicomesh_cstore_total", (("result", "ok"),))] == len(small_series.paths)
    assert samples[("dicomesh_cstore_total", (("result", "failed"),))] == 0
    assert samples[("dicomesh_store_studies", ())] == 1
    assert samples[("dicomesh_store_used_bytes", ())] > 0
    assert ("dicomesh_mesh_forbidden_total", ()) in samples
    assert "dicomesh_transfers" in families and "dicomesh_peer_received_bytes" in families


def test_search_status_logs_and_bundle_without_patient_data_in_logs(
    admin: tuple[Gateway, WebClient], small_series: SeriesInfo
) -> None:
    gw, client = admin
    storescu(gw.host, gw.port, gw.ae_title, small_series.paths)
    name = DEFAULT_PATIENT["PatientName"]
    found = client.get("/api/studies?patient_name=" + name.split("^")[0][:4] + "*").json()
    [study] = found["studies"]
    assert study["study_uid"] == small_series.study_uid and study["held_here"] is True
    assert study["PatientName"] == name and study["NumberOfStudyRelatedInstances"] == "6"
    assert client.get("/api/studies?patient_name=NOBODY*").json()["studies"] == []
    assert client.get("/api/studies?colour=blue").status == 400
    status = client.get("/api/status").json()
    assert status["version"] == __version__ and status["uptime_s"] >= 0
    assert status["store"]["studies"] == 1 and status["store"]["instances"] == 6
    assert status["dicom"]["counters"]["stores_ok"] == 6
    logs = client.get("/api/logs?level=info").json()["lines"]
    assert any("association" in line["message"] for line in logs)
    bundle = client.get("/api/diagnostics")
    assert bundle.status == 200 and "attachment" in bundle.headers["Content-Disposition"]
    with tarfile.open(fileobj=io.BytesIO(bundle.body)) as tar:
        members = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert set(members) >= {"dicomesh/config.toml", "dicomesh/status.json", "dicomesh/recent.log"}
    assert 'ae_title = "DICOMESH"' in members["dicomesh/config.toml"]
    for text in (*members.values(), gw.log(), str(logs)):
        for attr in ("PatientName", "PatientID"):
            assert DEFAULT_PATIENT[attr] not in text


def test_overlay_sources_need_the_admin_flag(gateway_factory: Callable[..., Gateway]) -> None:
    """127.0.0.2 stands for a peer's overlay address (loopback only, no namespace needed)."""
    gw = gateway_factory()
    owner = WebClient(_base(gw))
    owner.setup(_setup_code(gw))
    key = _key()
    peer = {"name": "site-b", "public_key": key, "addresses": ["127.0.0.2"]}
    assert owner.post("/api/peers", peer).status == 201
    remote = WebClient(_base(gw), source="127.0.0.2")
    deadline = time.monotonic() + 10  # the mesh reloads the registry every 2 s
    while remote.get("/api/session").status != 403 and time.monotonic() < deadline:
        time.sleep(0.2)
    refused = remote.get("/api/session")
    assert refused.status == 403 and "admin peers only" in refused.json()["error"]
    assert remote.login().status == 403  # refused before any password is checked
    assert remote.get("/").status == 403
    owner.request("DELETE", "/api/peers/site-b")
    assert owner.post("/api/peers", {**peer, "admin": True}).status == 201
    while remote.get("/api/session").status == 403 and time.monotonic() < deadline + 5:
        time.sleep(0.2)
    assert remote.get("/api/status").status == 401  # now it may try, with the password
    assert remote.login().status == 200
    assert remote.get("/api/status").status == 200


def _wait_json(client: WebClient, path: str, done: Callable[[dict], bool], timeout: float) -> dict:
    """GET `path` until `done(json)` (every 0.2 s, at most `timeout` s); the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        got = client.get(path).json()
        if done(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def _send_until_finished(client: WebClient, job_id: str, timeout: float = 30) -> list[dict]:
    """Poll send `job_id` as the page does (every 0.2 s) until it finished; every answer."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        seen.append(next(s for s in client.get("/api/sends").json()["sends"] if s["id"] == job_id))
        if seen[-1]["finished"] or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


def test_send_study_to_a_known_node(
    gateway_factory: Callable[..., Gateway], small_series: SeriesInfo, tmp_path: Path
) -> None:
    dest_port, dead_port = free_port(), free_port()
    nodes = [{"ae_title": "WS_DEST", "host": "127.0.0.1", "port": dest_port},
             {"ae_title": "WS_DOWN", "host": "127.0.0.1", "port": dead_port}]  # fmt: skip
    gw = gateway_factory(dicom={"nodes": nodes}, web=FAST_EVENTS)
    client = WebClient(_base(gw))
    assert client.setup(_setup_code(gw)).status == 200
    assert storescu(gw.host, gw.port, gw.ae_title, small_series.paths).ok
    study = small_series.study_uid
    # Validation names the field; an unknown node is refused before anything starts.
    bad = client.post("/api/sends", {"destination": 7})
    assert bad.status == 400
    assert {e.split(":")[0] for e in bad.json()["errors"]} == {"study", "destination"}
    unknown = client.post("/api/sends", {"study": study, "destination": "NOBODY"})
    assert unknown.status == 400 and unknown.json()["errors"][0].startswith(
        "destination: 'NOBODY' is not a known node"
    )
    assert client.post("/api/sends", {"study": study, "destination": "WS_DEST"},
                       csrf=False).status == 403  # fmt: skip
    # A study neither held here nor in the catalog: the send ends at once, saying so.
    nowhere = client.post("/api/sends", {"study": "1.2.3.4.5", "destination": "WS_DEST"})
    assert nowhere.status == 202
    ended = _send_until_finished(client, nowhere.json()["id"])[-1]
    assert ended["error"] == "study not held here nor known in the mesh" and ended["total"] == 0
    with StoreSCP(tmp_path / "dest", "WS_DEST", port=dest_port) as scp:
        started = client.post("/api/sends", {"study": study, "destination": "WS_DEST"})
        assert started.status == 202, started
        job = started.json()
        assert job["study"] == study and job["destination"] == "WS_DEST"
        seen = _send_until_finished(client, job["id"])
        done = seen[-1]
        assert done["error"] is None, done
        assert (done["total"], done["completed"], done["failed"], done["remaining"]) == (6, 6, 0, 0)
        assert done["bytes_sent"] > 0 and done["eta_s"] is None
        # What the page polls only ever moves forward, and adds up.
        counts = [j["completed"] for j in seen]
        assert counts == sorted(counts)
        assert all(j["completed"] + j["failed"] + j["remaining"] == j["total"] for j in seen)
        received = scp.files()
        assert len(received) == len(small_series.paths)
    # The stored bytes went out as received: the same SOP instances arrived.
    sent = {p.name.split(".", 1)[1] for p in received}
    assert sent == {str(pydicom.dcmread(p).SOPInstanceUID) for p in small_series.paths}
    # A node that does not answer: the send ends with the reason, nothing hangs.
    down = client.post("/api/sends", {"study": study, "destination": "WS_DOWN"}).json()
    shown = _send_until_finished(client, down["id"])[-1]
    assert shown["error"] == "no association" and shown["completed"] == 0
    status = client.get("/api/status").json()
    assert [s["id"] for s in status["sends"]] == [nowhere.json()["id"], job["id"], down["id"]]
    samples = {(s.name, tuple(s.labels.items())): s.value
               for f in text_string_to_metric_families(client.get("/metrics").body.decode())
               for s in f.samples}  # fmt: skip
    assert samples[("dicomesh_dicom_sends", (("state", "done"),))] == 1
    assert samples[("dicomesh_dicom_sends", (("state", "failed"),))] == 2
    assert client.request("DELETE", "/api/sends/nope").status == 404
    assert client.request("DELETE", f"/api/sends/{job['id']}").json()["finished"] is True
    for attr in ("PatientName", "PatientID"):
        assert DEFAULT_PATIENT[attr] not in gw.log()


def test_storage_settings_applied_at_once(
    admin: tuple[Gateway, WebClient], small_series: SeriesInfo
) -> None:
    gw, client = admin
    got = client.get("/api/settings/store").json()
    assert got["file"] == str(gw.config_path) and "eviction" in got["note"]
    settings = got["settings"]
    before = gw.config_path.read_text()
    wrong = {**settings, "max_bytes": "lots", "compression": "lz4", "x": 1}
    bad = client.request("PUT", "/api/settings/store", wrong)
    assert bad.status == 400
    named = {e.split(":")[0] for e in bad.json()["errors"]}
    assert named == {"store.max_bytes", "store.compression", "store.x"}
    assert gw.config_path.read_text() == before
    # A quota far below one instance: applied at once, the store refuses (0xA700).
    tiny = client.request("PUT", "/api/settings/store", {**settings, "max_bytes": "1 kB"})
    assert tiny.status == 200 and tiny.json()["settings"]["max_bytes"] == 1000
    assert tomllib.loads(gw.config_path.read_text())["store"]["max_bytes"] == 1000
    assert client.get("/api/status").json()["store"]["quota_bytes"] == 1000
    refused = storescu(gw.host, gw.port, gw.ae_title, small_series.paths[:1])
    assert refused.results[0][1] == 0xA700
    shown = client.get("/api/status").json()
    assert shown["store"]["full_reason"] and "quota" in shown["store"]["full_reason"]
    assert any("store full" in line["message"] for line in shown["errors"])  # recent errors
    assert client.request("PUT", "/api/settings/store", {**settings, "max_bytes": 0}).status == 200
    assert storescu(gw.host, gw.port, gw.ae_title, small_series.paths[:1]).ok
    assert client.get("/api/status").json()["restart_needed"] == []
    load_config(gw.config_path)  # the file stays valid for the next start


def test_eviction_settings_applied_and_planned(
    admin: tuple[Gateway, WebClient], small_series: SeriesInfo
) -> None:
    gw, client = admin
    storescu(gw.host, gw.port, gw.ae_title, small_series.paths)
    got = client.get("/api/settings/evict").json()
    assert got["running"] is True and "plan" in got["note"]
    settings = got["settings"]
    before = gw.config_path.read_text()
    bad = client.request("PUT", "/api/settings/evict", {**settings, "half_life_days": 0,
                                                        "max_bytes": "much"})  # fmt: skip
    assert bad.status == 400
    assert {e.split(":")[0] for e in bad.json()["errors"]} == {
        "evict.half_life_days", "evict.max_bytes"}  # fmt: skip
    # Valid alone, but the store's own reserve would refuse instances before eviction starts.
    store = client.get("/api/settings/store").json()["settings"]
    pre_empted = client.request("PUT", "/api/settings/evict", {
        **settings, "enabled": True, "min_free_bytes": store["min_free_bytes"]})  # fmt: skip
    assert pre_empted.status == 400
    assert pre_empted.json()["errors"] == [
        "evict.min_free_bytes: must be above store.min_free_bytes"]  # fmt: skip
    assert gw.config_path.read_text() == before
    # Limits off: nothing presses. Then a 1 kB limit: the next plan sees it, no restart.
    off = client.request("PUT", "/api/settings/evict", {**settings, "min_free_bytes": 0})
    assert off.status == 200 and off.json()["applied"] is True
    assert client.get("/api/evict/plan").json()["pressure"] == []
    tight = client.request("PUT", "/api/settings/evict", {**settings, "min_free_bytes": 0,
                                                          "max_bytes": "1 kB"})  # fmt: skip
    assert tight.status == 200 and tight.json()["restart_needed"] == []
    assert load_config(gw.config_path).evict.max_bytes == 1000
    plan = client.get("/api/evict/plan").json()
    [crossed] = plan["pressure"]
    assert "> max" in crossed and plan["need_bytes"] > 0
    # Held here only: kept, and the plan says why; nothing was deleted (a plan is a dry run).
    [kept] = plan["kept"]
    assert kept["study"] == small_series.study_uid and kept["reason"]
    assert plan["victims"] == [] and plan["dry_run"] is True
    assert client.get("/api/status").json()["store"]["instances"] == len(small_series.paths)


def test_uplink_settings_written_for_the_next_start(admin: tuple[Gateway, WebClient]) -> None:
    gw, client = admin
    got = client.get("/api/settings/net").json()
    assert got["applied"] is False and "restart" in got["note"] and got["running"] is False
    original = got["settings"]
    uplinks = [
        {"name": "adsl1", "interface": "eth1", "gateway": "192.168.1.1", "up_kbps": 800,
         "down_kbps": 3000},
        {"name": "adsl1", "interface": "eth 2", "gateway": "somewhere", "up_kbps": 0,
         "down_kbps": 3000},
    ]  # fmt: skip
    bad = client.request("PUT", "/api/settings/net", {**original, "uplinks": uplinks})
    assert bad.status == 400
    errors = bad.json()["errors"]
    for key in ("interface", "gateway", "up_kbps"):
        assert any(e.startswith(f"net.uplinks[1].{key}: ") for e in errors), (key, errors)
    uplinks[1] = {"name": "adsl2", "interface": "eth2", "gateway": "dhcp", "up_kbps": 800,
                  "down_kbps": 3000, "shape": {"enabled": True}}  # fmt: skip
    ok = client.request("PUT", "/api/settings/net", {**original, "uplinks": uplinks})
    assert ok.status == 200, ok
    assert ok.json()["restart_needed"] == ["net"] and ok.json()["applied"] is False
    on_disk = load_config(gw.config_path).net
    assert [u.name for u in on_disk.uplinks] == ["adsl1", "adsl2"]
    assert on_disk.uplinks[1].shape.enabled and on_disk.uplinks[0].gateway == "192.168.1.1"
    assert client.get("/api/status").json()["restart_needed"] == ["net"]
    # Back to what runs: nothing to restart for.
    back = client.request("PUT", "/api/settings/net", original).json()
    assert back["restart_needed"] == [] and load_config(gw.config_path).net.uplinks == []


SCENARIO = """duration_s = 20
seed = 3
[[links]]
name = "wan"
preset = "frame-relay-128"
[[flows]]
name = "ecg"
kind = "cbr"
packet_bytes = 200
interval_ms = 20
path = ["wan"]
"""


def test_qos_simulation_and_report(admin: tuple[Gateway, WebClient]) -> None:
    _, client = admin
    not_toml = client.post("/api/qos/simulate", {"toml": "duration_s = ="})
    assert not_toml.status == 400 and not_toml.json()["errors"][0].startswith("toml: ")
    broken = SCENARIO.replace('preset = "frame-relay-128"', "capacity_kbps = -1")
    invalid = client.post("/api/qos/simulate", {"toml": broken})
    assert invalid.status == 400
    assert any(e.startswith("scenario.links[0].capacity_kbps: ") for e in invalid.json()["errors"])
    started = client.post("/api/qos/simulate", {"toml": SCENARIO, "label": "ecg 128k",
                                                "samples": True})  # fmt: skip
    assert started.status == 202, started
    run_id = started.json()["id"]
    runs = _wait_json(client, "/api/qos/runs", lambda j: not j["busy"], 60)
    [run] = runs["runs"]
    assert run["state"] == "done", run
    ecg = run["flows"]["ecg"]
    # 200 B every 20 ms = 80 kbit/s offered on a 128 kbit/s line: nothing lost.
    assert ecg["sent"] > 900 and ecg["loss_ratio"] == 0 and ecg["delay_mean_ms"] > 10
    assert 0.5 < run["links"]["wan"]["utilisation"] < 0.7
    full = client.get(f"/api/qos/runs/{run_id}").json()
    assert full["result"]["flows"]["ecg"]["samples"]
    second = client.post("/api/qos/simulate", {"scenario": {
        "duration_s": 20, "links": [{"name": "wan", "capacity_kbps": 64}],
        "flows": [{"name": "ecg", "kind": "cbr", "packet_bytes": 200, "interval_ms": 20,
                   "path": ["wan"]}]}}).json()  # fmt: skip
    _wait_json(client, "/api/qos/runs", lambda j: not j["busy"], 60)
    over = client.get(f"/api/qos/runs/{second['id']}").json()["flows"]["ecg"]
    assert 0.1 < over["loss_ratio"] < 0.3  # 80 kbit/s into 64 kbit/s: ~20 % dropped
    report = client.get(f"/api/qos/report?left={run_id}&right={second['id']}", timeout=90)
    assert report.status == 200 and report.headers["Content-Type"].startswith("text/html")
    assert "script" not in report.headers["Content-Security-Policy"]
    assert "QoS report" in report.body.decode() and "data:image/png;base64" in report.body.decode()
    assert client.get("/api/qos/report?left=q99&right=q1").json()["error"].startswith("left:")
    assert client.get("/api/qos/runs/q99").status == 404


def test_qos_measure_toward_a_peer(gateway_factory: Callable[..., Gateway]) -> None:
    probe_port = free_port()
    holder = gateway_factory(qos={"probe_port": probe_port})
    gw = gateway_factory(qos={"probe_port": free_port()})
    holder.admit(gw)
    gw.admit(holder)
    client = WebClient(_base(gw))
    assert client.setup(_setup_code(gw)).status == 200
    bad = client.post("/api/qos/measure", {"peer": "nobody", "duration_s": 600,
                                           "flows": ["cbr:10:20"], "port": 0})  # fmt: skip
    assert bad.status == 400
    named = {e.split(":")[0] for e in bad.json()["errors"]}
    assert named == {"peer", "duration_s", "flows", "port"}
    wanted = {"peer": holder.mesh_name, "duration_s": 1, "flows": ["cbr:200:20"],
              "port": probe_port}  # fmt: skip
    started = client.post("/api/qos/measure", wanted)
    assert started.status == 202, started
    busy = client.post("/api/qos/simulate", {"toml": SCENARIO})
    assert busy.status == 409  # one run at a time
    run = _wait_json(client, "/api/qos/runs", lambda j: not j["busy"], 40)["runs"][0]
    assert run["state"] == "done", run
    flow = run["flows"]["cbr1"]
    assert flow["sent"] == 50 and flow["received"] == 50 and flow["loss_ratio"] == 0


def test_send_cancelled_mid_study(
    gateway_factory: Callable[..., Gateway], small_series: SeriesInfo
) -> None:
    """Cancel while the node holds the first instance: the send stops after it, says so,
    and the association ends cleanly (no further instance arrives)."""
    import threading

    from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    port = free_port()
    gw = gateway_factory(dicom={"nodes": [{"ae_title": "WS_SLOW", "host": "127.0.0.1",
                                           "port": port}]})  # fmt: skip
    client = WebClient(_base(gw))
    assert client.setup(_setup_code(gw)).status == 200
    assert storescu(gw.host, gw.port, gw.ae_title, small_series.paths).ok
    holding, release = threading.Event(), threading.Event()
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        holding.set()
        release.wait(30)
        return 0x0000

    node = AE(ae_title="WS_SLOW")
    for cx in AllStoragePresentationContexts:
        node.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = node.start_server(("127.0.0.1", port), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, on_store)])  # fmt: skip
    try:
        job = client.post("/api/sends", {"study": small_series.study_uid,
                                         "destination": "WS_SLOW"}).json()  # fmt: skip
        assert holding.wait(30)
        asked = client.request("DELETE", f"/api/sends/{job['id']}").json()
        assert asked["finished"] is False and asked["total"] == 6
        release.set()
        done = _send_until_finished(client, job["id"])[-1]
    finally:
        release.set()
        server.shutdown()
    assert done["finished"] and done["cancelled"] and done["error"] is None, done
    assert (done["completed"], done["remaining"]) == (1, 5)
    assert len(received) == 1
    assert "cancelled, 1 completed" in gw.log()


def test_update_bundle_upload_is_verified_before_it_is_queued(
    gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    """A bundle signed with the baked-in key is queued for dicomesh-update.service under its
    trigger name; a foreign signature or a truncated upload is refused with nothing queued."""
    from appliance.firmware import bundle as bundles
    from appliance.firmware import inbox

    ours, theirs = bundles.generate_key(), bundles.generate_key()
    public = tmp_path / "update.pub"
    public.write_bytes(bundles.public_key_pem(ours.public_key()))
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "dicomesh").write_text("#!/bin/sh\n" + "# payload\n" * 20000)
    good, foreign = tmp_path / "good.bundle", tmp_path / "foreign.bundle"
    bundles.build(tree, good, ours, "9.9.9")
    bundles.build(tree, foreign, theirs, "6.6.6")
    gw = gateway_factory(web={"update_key": str(public)})
    client = WebClient(_base(gw))
    assert client.setup(_setup_code(gw)).status == 200
    upload = dict(content_type="application/octet-stream")
    incoming = gw.state_dir / inbox.UPDATES_DIR / inbox.INCOMING

    refused = client.post("/api/system/update", foreign.read_bytes(), **upload)
    assert refused.status == 400 and refused.json()["error"].startswith("bundle:"), refused
    cut = good.read_bytes()[: good.stat().st_size * 2 // 3]
    assert client.post("/api/system/update", cut, **upload).status == 400
    assert not incoming.exists()
    assert client.get("/api/system/update").json()["pending"] is False
    assert "not queued" not in gw.log()

    queued = client.post("/api/system/update", good.read_bytes(), **upload)
    assert queued.status == 202 and queued.json() == {"version": "9.9.9", "queued": True}
    assert incoming.read_bytes() == good.read_bytes()
    assert sorted(p.name for p in incoming.parent.iterdir()) == [inbox.INCOMING]
    assert client.get("/api/system/update").json()["pending"] is True
    again = client.post("/api/system/update", good.read_bytes(), **upload)
    assert again.status == 409
    anonymous = WebClient(_base(gw))
    assert anonymous.post("/api/system/update", good.read_bytes(), **upload).status in (401, 403)
