"""Updates pulled from a peer (appliance/firmware/share.py) between two real gateway processes
on loopback: the serving gateway offers the bundle `dicomesh-update install --keep` left in
its state directory, over its mesh server (admitted peers only); the pulling one fetches it
(`dicomesh update pull`, or the admin page), verifies it and queues it for
dicomesh-update.service, only when the signed version is newer than its own.

Keys are generated per test in tmp_path; none is ever written into the repository."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from gateway import DICOMESH, REPO, Gateway
from webkit import WebClient

from appliance import __version__
from appliance.firmware import bundle as bundles
from appliance.firmware import inbox
from appliance.firmware.share import PullError, check_newer

SERVER, PULLER, STRANGER = "127.0.0.61", "127.0.0.62", "127.0.0.69"


class Keys:
    def __init__(self, tmp: Path) -> None:
        self.ours, self.theirs = bundles.generate_key(), bundles.generate_key()
        tmp.mkdir()
        self.public = tmp / "update.pub"
        self.public.write_bytes(bundles.public_key_pem(self.ours.public_key()))
        self.tmp = tmp

    def bundle(self, version: str, *, foreign: bool = False) -> Path:
        """A signed tree bundle whose bin/dicomesh answers `health` (for a real install)."""
        tree = self.tmp / f"tree-{version}"
        (tree / "bin").mkdir(parents=True, exist_ok=True)
        script = tree / "bin" / "dicomesh"
        script.write_text('#!/bin/sh\n[ "$1" = health ] && exit 0\n' + "# payload\n" * 30000)
        script.chmod(0o755)
        out = self.tmp / f"{version}{'-foreign' if foreign else ''}.bundle"
        bundles.build(tree, out, self.theirs if foreign else self.ours, version)
        return out


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


def pair(
    factory: Callable[..., Gateway], keys: Keys, *, server_admits_puller: bool = True
) -> tuple[Gateway, Gateway]:
    """The serving and the pulling gateway, on their own loopback addresses."""
    web = {"update_key": str(keys.public)}
    server = factory(start=False, mesh={"address": SERVER}, web=web)
    puller = factory(start=False, mesh={"address": PULLER}, web=web)
    puller.admit(server)
    if server_admits_puller:
        server.admit(puller)
    return server.start(), puller.start()


def pull(gw: Gateway, peer: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DICOMESH, "update", "--config", str(gw.config_path), "pull", peer, *extra],
        capture_output=True, text=True, timeout=60, cwd=gw.workdir,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def offered(gw: Gateway) -> Path:
    return gw.state_dir / inbox.UPDATES_DIR / inbox.INSTALLED


def queued(gw: Gateway) -> Path:
    return gw.state_dir / inbox.UPDATES_DIR / inbox.INCOMING


def updates_dir(gw: Gateway) -> list[str]:
    return sorted(p.name for p in (gw.state_dir / inbox.UPDATES_DIR).iterdir())


def install_and_keep(keys: Keys, bundle: Path, root: Path, keep: Path) -> None:
    """What dicomesh-update.service does on the serving gateway: install, keep the bundle."""
    keep.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [*DICOMESH[:2], "appliance.firmware.update_cli", "install", str(bundle),
         "--root", str(root), "--key", str(keys.public), "--remove", "--keep", str(keep),
         "--activate-cmd", "true", "--health-cmd", "{slot}/bin/dicomesh health",
         "--health-timeout", "10", "--health-interval", "0.05"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_newer_bundle_is_pulled_verified_and_queued(
    gateway_factory: Callable[..., Gateway], keys: Keys, tmp_path: Path
) -> None:
    server, puller = pair(gateway_factory, keys)
    nothing = pull(puller, server.mesh_name)
    assert nothing.returncode == 1 and "has no update bundle to share" in nothing.stderr

    newer = keys.bundle("9.9.9")
    expected = newer.read_bytes()
    install_and_keep(keys, newer, tmp_path / "opt", offered(server))
    assert not newer.exists() and offered(server).read_bytes() == expected

    done = pull(puller, server.mesh_name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "version 9.9.9 verified and queued" in done.stdout
    assert queued(puller).read_bytes() == expected
    assert updates_dir(puller) == [inbox.INCOMING]  # no part file, no scratch left
    assert f"sending the installed bundle to {puller.mesh_name}" in server.log()
    again = pull(puller, server.mesh_name)
    assert again.returncode == 1 and "already being installed" in again.stderr
    assert pull(puller, "no-such-peer").returncode == 1

    # An older version: refused before a byte of the bundle moves, unless forced.
    queued(puller).unlink()
    older = keys.bundle("0.0.1")
    older.replace(offered(server))
    refused = pull(puller, server.mesh_name)
    assert refused.returncode == 1 and f"older than {__version__}" in refused.stderr
    assert updates_dir(puller) == []
    forced = pull(puller, server.mesh_name, "--force")
    assert forced.returncode == 0, forced.stderr
    assert queued(puller).read_bytes() == offered(server).read_bytes()

    # The admin page: the same pull, its progress and outcome in GET /api/system/update.
    queued(puller).unlink()
    keys.bundle("9.9.10").replace(offered(server))
    page = WebClient(f"http://127.0.0.1:{puller.web_port}")
    assert page.setup((puller.state_dir / "setup-code").read_text().strip()).status == 200
    unknown = page.post("/api/system/update/pull", {"peer": "nobody"})
    assert unknown.status == 404 and "no admitted peer" in unknown.json()["error"], unknown
    started = page.post("/api/system/update/pull", {"peer": server.mesh_name})
    assert started.status == 202, started
    assert started.json()["version"] == "9.9.10"
    busy_or_done = page.post("/api/system/update/pull", {"peer": server.mesh_name})
    assert busy_or_done.status == 409, busy_or_done
    deadline = time.monotonic() + 30
    while not (state := page.get("/api/system/update").json()["pull"])["finished"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    assert state["queued"] and state["error"] is None, state
    assert state["received"] == offered(server).stat().st_size
    assert queued(puller).read_bytes() == offered(server).read_bytes()
    after = page.post("/api/system/update/pull", {"peer": server.mesh_name})
    assert after.status == 409 and "already being installed" in after.json()["error"], after


def test_bad_bundles_and_unadmitted_requesters_are_refused(
    gateway_factory: Callable[..., Gateway], keys: Keys
) -> None:
    server, puller = pair(gateway_factory, keys, server_admits_puller=False)
    offered(server).parent.mkdir(parents=True, exist_ok=True)
    keys.bundle("9.9.9").replace(offered(server))

    # Not admitted by the server: 403 for the gateway's pull and for anyone else.
    denied = pull(puller, server.mesh_name)
    assert denied.returncode == 1 and "HTTP 403" in denied.stderr, denied.stderr
    mesh = f"http://{server.mesh_address}:{server.mesh_port}"
    for route in ("/mesh/v1/update", "/mesh/v1/update/bundle"):
        assert WebClient(mesh, source=STRANGER).get(route).status == 403
    assert not (puller.state_dir / inbox.UPDATES_DIR).exists() or updates_dir(puller) == []
    assert "refused (403)" in server.log()

    server.admit(puller)  # the registry file is re-read within a few seconds
    foreign = keys.bundle("9.9.9", foreign=True)
    foreign.replace(offered(server))
    deadline = time.monotonic() + 20
    while "HTTP 403" in (bad := pull(puller, server.mesh_name)).stderr:
        assert time.monotonic() < deadline, "the server never admitted the puller"
        time.sleep(0.5)
    assert bad.returncode == 1 and "bad signature" in bad.stderr, bad.stderr
    assert updates_dir(puller) == []

    good = keys.bundle("9.9.9").read_bytes()
    offered(server).write_bytes(good[: len(good) * 2 // 3])
    cut = pull(puller, server.mesh_name)
    assert cut.returncode == 1 and "truncated" in cut.stderr, cut.stderr
    assert updates_dir(puller) == []
    assert "verified and queued" not in puller.log()


def test_versions_are_compared_not_sorted_as_text() -> None:
    check_newer("0.10.0", "0.9.1", "p", force=False)
    check_newer("1.0.0", "1.0.0rc1", "p", force=False)
    for offered_version in ("0.9.1", "0.1.0", "not a version"):
        with pytest.raises(PullError) as refused:
            check_newer(offered_version, "0.10.0" if offered_version != "0.1.0" else "0.1.0", "p",
                        force=False)  # fmt: skip
        assert refused.value.status == 409
    check_newer("0.0.1", "0.10.0", "p", force=True)
