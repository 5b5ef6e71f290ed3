"""Signed A/B updates (appliance/firmware/{bundle,slots,update}.py) on a temp slot root.

The "versions" are tiny trees whose bin/dicomesh is a real shell script: the health check
runs it (`{slot}/bin/dicomesh health`), so a failing new version is a real failing process.
Keys are generated per test in tmp_path; none is ever written into the repository.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from appliance.firmware import bundle as bundles
from appliance.firmware.slots import SLOT_MANIFEST, Layout
from appliance.firmware.update import HealthCheck, Updater, UpdateResult, recover

REPO = Path(__file__).resolve().parent.parent


def make_version(where: Path, version: str, *, healthy: bool = True) -> Path:
    """A slot tree: bin/dicomesh answers `health` with exit 0 (healthy) or 1."""
    tree = where / f"tree-{version}"
    (tree / "bin").mkdir(parents=True)
    (tree / "lib").mkdir()
    script = tree / "bin" / "dicomesh"
    script.write_text(
        f'#!/bin/sh\n[ "$1" = health ] && exit {0 if healthy else 1}\necho dicomesh {version}\n'
    )
    script.chmod(0o755)
    (tree / "lib" / "code.py").write_text(f"MARKER = 'PAYLOAD-MARKER-{version}'\n" * 50)
    return tree


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    key = bundles.generate_key()
    private, public = tmp_path / "keys" / "signing.pem", tmp_path / "keys" / "update.pub"
    private.parent.mkdir()
    private.write_bytes(bundles.private_key_pem(key))
    public.write_bytes(bundles.public_key_pem(key.public_key()))
    return private, public


def sign(tmp_path: Path, private: Path, version: str, *, healthy: bool = True) -> Path:
    out = tmp_path / f"dicomesh-{version}.bundle"
    tree = make_version(tmp_path, version, healthy=healthy)
    bundles.build(tree, out, bundles.load_private_key(private), version)
    return out


def health(tmp_path: Path, **kw: float) -> HealthCheck:
    """Activation appends the slot to a log (a stand-in for `systemctl restart`); health runs
    the new slot's own binary. Bounds shrunk for tests."""
    log = tmp_path / "activations.log"
    return HealthCheck(
        activate=("sh", "-c", f'echo "$0" >> {log}', "{slot}"),
        command=("{slot}/bin/dicomesh", "health"),
        timeout_s=kw.get("timeout_s", 3.0),
        interval_s=kw.get("interval_s", 0.05),
        passes=int(kw.get("passes", 2)),
        command_timeout_s=kw.get("command_timeout_s", 2.0),
    )


def activations(tmp_path: Path) -> list[str]:
    log = tmp_path / "activations.log"
    return [Path(line).name for line in log.read_text().split()] if log.exists() else []


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


@pytest.fixture
def running(tmp_path: Path, keys: tuple[Path, Path]) -> Updater:
    """A root with version 1.0 installed and healthy in slot a."""
    root = tmp_path / "opt"
    updater = Updater(root, bundles.load_public_key(keys[1]), health(tmp_path))
    result = updater.install(sign(tmp_path, keys[0], "1.0"))
    assert (result.outcome, result.slot, result.previous) == ("installed", "a", None), result
    (tmp_path / "activations.log").unlink()
    return updater


def assert_untouched(updater: Updater, before: dict[str, bytes], result: UpdateResult) -> None:
    layout = updater.layout
    assert layout.active() == "a" and result.slot == "a"
    assert snapshot(layout.slot("a")) == before
    assert not layout.slot("b").exists()
    assert layout.pending() is None
    # No staging leftovers next to the slots.
    assert sorted(p.name for p in (layout.root / "slots").iterdir()) == ["a"]


def test_good_bundle_installs_and_switches(tmp_path: Path, keys, running: Updater) -> None:
    before = snapshot(running.layout.slot("a"))
    result = running.install(sign(tmp_path, keys[0], "2.0"))
    assert (result.outcome, result.version, result.slot, result.previous) == (
        "installed", "2.0", "b", "a",
    )  # fmt: skip
    assert result.error is None and result.health_runs == 2
    layout = running.layout
    assert os.readlink(layout.current) == "slots/b"
    out = subprocess.run([layout.current / "bin" / "dicomesh"], capture_output=True, text=True)
    assert out.stdout.strip() == "dicomesh 2.0"
    assert snapshot(layout.slot("a")) == before  # the old slot stays for the next rollback
    manifest = json.loads((layout.slot("b") / SLOT_MANIFEST).read_text())
    assert manifest["version"] == "2.0"
    assert activations(tmp_path) == ["b"]
    assert layout.pending() is None
    # The next update goes into slot a again (the inactive one).
    assert running.install(sign(tmp_path, keys[0], "3.0")).slot == "a"


def test_bad_signature_is_rejected(tmp_path: Path, running: Updater) -> None:
    before = snapshot(running.layout.slot("a"))
    other = tmp_path / "other.pem"
    other.write_bytes(bundles.private_key_pem(bundles.generate_key()))
    result = running.install(sign(tmp_path, other, "2.0"))
    assert result.outcome == "rejected" and "bad signature" in (result.error or "")
    assert_untouched(running, before, result)
    assert activations(tmp_path) == []


@pytest.mark.parametrize("keep", [0.5, 0.02], ids=["half", "inside-manifest"])
def test_truncated_bundle_is_rejected(tmp_path: Path, keys, running: Updater, keep: float) -> None:
    before = snapshot(running.layout.slot("a"))
    path = sign(tmp_path, keys[0], "2.0")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    result = running.install(path)
    assert result.outcome == "rejected" and "truncated" in (result.error or ""), result
    assert_untouched(running, before, result)


def test_bundle_cut_at_a_member_boundary_is_rejected(
    tmp_path: Path, keys, running: Updater
) -> None:
    """A tar that simply ends early (no partial member) lacks files the manifest lists."""
    before = snapshot(running.layout.slot("a"))
    path = sign(tmp_path, keys[0], "2.0")
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(path, "w") as tar:
        for member, data in members[:-1]:
            tar.addfile(member, io.BytesIO(data))
    result = running.install(path)
    assert result.outcome == "rejected" and "files missing" in (result.error or ""), result
    assert_untouched(running, before, result)


def test_tampered_file_is_rejected(tmp_path: Path, keys, running: Updater) -> None:
    before = snapshot(running.layout.slot("a"))
    path = sign(tmp_path, keys[0], "2.0")
    data = path.read_bytes()
    assert data.count(b"PAYLOAD-MARKER-2.0") >= 1
    path.write_bytes(data.replace(b"PAYLOAD-MARKER-2.0", b"PAYLOAD-MARKER-6.6", 1))
    result = running.install(path)
    assert result.outcome == "rejected", result
    assert "lib/code.py: SHA-256 differs" in (result.error or "")
    assert_untouched(running, before, result)


def test_tampered_manifest_is_rejected(tmp_path: Path, keys, running: Updater) -> None:
    before = snapshot(running.layout.slot("a"))
    path = sign(tmp_path, keys[0], "2.0")
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"version": "2.0"', b'"version": "2.1"', 1))
    result = running.install(path)
    assert result.outcome == "rejected" and "bad signature" in (result.error or "")
    assert_untouched(running, before, result)


def signed_tar(path: Path, private: Path, manifest: dict, members: dict[str, bytes]) -> Path:
    """A hand-made bundle with a validly signed manifest (for malicious layouts)."""
    raw = json.dumps(manifest).encode()
    sig = bundles.load_private_key(private).sign(raw)
    with tarfile.open(path, "w") as tar:
        for name, data in {"manifest.json": raw, "manifest.sig": sig, **members}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_signed_path_traversal_and_extra_members_are_rejected(
    tmp_path: Path, keys, running: Updater
) -> None:
    before = snapshot(running.layout.slot("a"))
    entry = {"path": "../../evil", "size": 1, "sha256": "0" * 64, "mode": 0o644}
    manifest = {"format": bundles.FORMAT, "version": "6", "files": [entry]}
    bad = signed_tar(tmp_path / "evil.bundle", keys[0], manifest, {"payload/../../evil": b"x"})
    result = running.install(bad)
    assert result.outcome == "rejected" and "unsafe path" in (result.error or "")
    manifest["files"] = []
    extra = signed_tar(tmp_path / "extra.bundle", keys[0], manifest, {"payload/x": b"x"})
    result = running.install(extra)
    assert result.outcome == "rejected" and "not in the manifest" in (result.error or "")
    assert_untouched(running, before, result)
    assert not (tmp_path / "evil").exists()


def test_unhealthy_version_is_rolled_back(tmp_path: Path, keys, running: Updater) -> None:
    before = snapshot(running.layout.slot("a"))
    started = time.monotonic()
    result = running.install(sign(tmp_path, keys[0], "2.0", healthy=False))
    took = time.monotonic() - started
    assert result.outcome == "rolled_back", result
    assert result.error == "version 2.0 not healthy within 3 s"
    assert (result.slot, result.version) == ("a", "2.0")
    assert result.health_runs > 2  # it was polled until the bound, not given up at once
    assert 3.0 <= took < 6.0, took
    layout = running.layout
    assert os.readlink(layout.current) == "slots/a" and layout.pending() is None
    assert snapshot(layout.slot("a")) == before
    # Activated the new slot, then the old one again after the rollback.
    assert activations(tmp_path) == ["b", "a"]


def test_hanging_health_check_is_bounded(tmp_path: Path, keys, running: Updater) -> None:
    running.health = HealthCheck(
        activate=(), command=("sleep", "30"), timeout_s=1.0, command_timeout_s=30.0
    )
    started = time.monotonic()
    result = running.install(sign(tmp_path, keys[0], "2.0"))
    assert result.outcome == "rolled_back" and time.monotonic() - started < 4.0
    assert running.layout.active() == "a"


def test_interrupted_update_is_recovered_at_boot(tmp_path: Path, keys, running: Updater) -> None:
    """Power cut after the switch, before the health check passed: the next boot goes back."""
    layout: Layout = running.layout
    assert running.install(sign(tmp_path, keys[0], "2.0")).slot == "b"
    layout.mark_pending("a", "b", "3.0")  # as _install does right before switching ...
    layout.switch("a")  # ... and the power goes
    assert recover(layout.root) == "b"
    assert layout.active() == "b" and layout.pending() is None
    assert recover(layout.root) is None  # nothing left to do on the next boot


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.firmware.update_cli", *args],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip


def test_cli_end_to_end(tmp_path: Path) -> None:
    private, public = tmp_path / "k" / "signing.pem", tmp_path / "k" / "update.pub"
    private.parent.mkdir()
    assert cli("keygen", "--private", str(private), "--public", str(public)).returncode == 0
    assert private.stat().st_mode & 0o077 == 0
    assert cli("keygen", "--private", str(private), "--public", str(public)).returncode == 2
    root, bundle = tmp_path / "opt", tmp_path / "v1.bundle"
    tree = make_version(tmp_path, "1.0")
    built = cli("build", str(tree), "--version", "1.0", "--key", str(private), "-o", str(bundle))
    assert built.returncode == 0, built.stderr
    assert "good signature, version 1.0" in cli("verify", str(bundle), "--key", str(public)).stdout
    result_file = tmp_path / "last-result.json"
    common = ["--root", str(root), "--key", str(public), "--result", str(result_file),
              "--activate-cmd", "true", "--health-cmd", "{slot}/bin/dicomesh health",
              "--health-timeout", "3", "--health-interval", "0.05"]  # fmt: skip
    done = cli("install", str(bundle), *common, "--remove")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not bundle.exists()  # --remove
    assert json.loads(result_file.read_text())["outcome"] == "installed"
    status = json.loads(cli("status", "--root", str(root)).stdout)
    assert status == {"active": "a", "pending": None, "a": "1.0", "b": None}
    # A bad bundle: exit 2, the result file says why, slot a keeps running.
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(b"not a tar at all" * 10)
    kept = tmp_path / "installed.bundle"
    rejected = cli("install", str(bad), *common, "--keep", str(kept))
    assert rejected.returncode == 2
    assert bad.exists() and not kept.exists()  # only an installed bundle is kept for peers
    assert "truncated or corrupt" in json.loads(result_file.read_text())["error"]
    assert json.loads(cli("status", "--root", str(root)).stdout)["active"] == "a"


def make_wheel(wheelhouse: Path, version: str) -> None:
    """A minimal pure-Python wheel named dicomesh (PEP 427) with a `dicomesh` console script
    that answers `health` with exit 0: stands in for the real wheelhouse of a release."""
    import base64
    import hashlib
    import zipfile

    dist = f"dicomesh-{version}.dist-info"
    files = {
        "fakegw.py": (
            "import sys\n\ndef main():\n    return 0 if sys.argv[1:] == ['health'] else 3\n"
        ),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: dicomesh\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
        f"{dist}/entry_points.txt": "[console_scripts]\ndicomesh = fakegw:main\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    wheelhouse.mkdir(parents=True)
    with zipfile.ZipFile(wheelhouse / f"dicomesh-{version}-py3-none-any.whl", "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)


def test_wheels_bundle_builds_a_venv_in_the_slot(tmp_path: Path, keys, running: Updater) -> None:
    """The production bundle kind: a verified wheelhouse, installed offline into a fresh venv
    at the slot's final path (venv scripts carry absolute paths)."""
    source = tmp_path / "release"
    make_wheel(source / "wheels", "2.0")
    bundle = tmp_path / "release.bundle"
    bundles.build(source, bundle, bundles.load_private_key(keys[0]), "2.0", kind="wheels")
    result = running.install(bundle)
    assert (result.outcome, result.slot) == ("installed", "b"), result
    slot = running.layout.slot("b")
    assert (slot / "pyvenv.cfg").exists() and (slot / SLOT_MANIFEST).exists()
    script = (slot / "bin" / "dicomesh").read_text()
    assert script.startswith(f"#!{slot}/bin/python")  # built in place, not in staging
    assert sorted(p.name for p in (running.layout.root / "slots").iterdir()) == ["a", "b"]
