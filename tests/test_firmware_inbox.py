"""The gateway's side of an update (appliance/firmware/inbox.py): a verified bundle is queued
for dicomesh-update.service under its trigger name; anything else leaves no file behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.firmware import FirmwareError, inbox
from appliance.firmware import bundle as bundles


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Path]:
    key = bundles.generate_key()
    public = tmp_path / "update.pub"
    public.write_bytes(bundles.public_key_pem(key.public_key()))
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "dicomesh").write_text("#!/bin/sh\n")
    out = tmp_path / "v2.bundle"
    bundles.build(tree, out, key, "2.0")
    return out, public


def chunks(path: Path, size: int = 4096) -> list[bytes]:
    data = path.read_bytes()
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_verified_bundle_is_queued(tmp_path: Path, signed: tuple[Path, Path]) -> None:
    bundle, public = signed
    state = tmp_path / "state"
    assert inbox.receive(state, chunks(bundle), public) == "2.0"
    updates = state / inbox.UPDATES_DIR
    assert sorted(p.name for p in updates.iterdir()) == [inbox.INCOMING]
    assert (updates / inbox.INCOMING).read_bytes() == bundle.read_bytes()
    with pytest.raises(FirmwareError, match="already"):
        inbox.receive(state, chunks(bundle), public)


def test_bad_bundle_leaves_nothing(tmp_path: Path, signed: tuple[Path, Path]) -> None:
    bundle, public = signed
    state = tmp_path / "state"
    other = tmp_path / "other.pub"
    other.write_bytes(bundles.public_key_pem(bundles.generate_key().public_key()))
    with pytest.raises(bundles.BundleError, match="bad signature"):
        inbox.receive(state, chunks(bundle), other)
    with pytest.raises(bundles.BundleError, match="truncated"):
        inbox.receive(state, chunks(bundle, 700)[:1], public)
    assert list((state / inbox.UPDATES_DIR).iterdir()) == []
    assert inbox.last_result(state) is None
