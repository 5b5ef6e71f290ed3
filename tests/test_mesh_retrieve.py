"""C-MOVE and C-GET at a gateway for a study held only by another one: the gateway swarms it
from the mesh and streams the instances out as they land."""

from __future__ import annotations

import pytest
from dcmtk import StoreSCP, getscu, movescu, storescu
from dicomfiles import dataset_bytes, sop_instance_uid
from nodekit import wait_until


def _pair(gateway_factory, dicom_b=None):
    mesh = {"sync_interval_s": 0.3}
    a = gateway_factory(start=False, mesh={**mesh, "address": "127.0.0.51"})
    b = gateway_factory(start=False, mesh={**mesh, "address": "127.0.0.52"}, dicom=dicom_b or {})
    a.admit(b)
    b.admit(a)
    a.start()
    b.start()
    return a, b


@pytest.mark.slow
def test_move_of_a_study_held_elsewhere(gateway_factory, ct_series, tmp_path):
    with StoreSCP(tmp_path / "dest", ae_title="WSDEST") as dest:
        node = {"ae_title": "WSDEST", "host": dest.host, "port": dest.port}
        a, b = _pair(gateway_factory, dicom_b={"nodes": [node]})
        assert storescu(a.host, a.port, a.ae_title, ct_series.paths).ok
        wait_until(lambda: len(b.find_images(ct_series.study_uid, ct_series.series_uid))
                   == len(ct_series.paths), timeout=20, what="B knows the study")  # fmt: skip
        keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={ct_series.study_uid}"]
        result = movescu(b.host, b.port, b.ae_title, keys, "WSDEST", timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        received = {sop_instance_uid(p): p for p in dest.files()}
        originals = {sop_instance_uid(p): p for p in ct_series.paths}
        assert set(received) == set(originals)
        for uid, path in received.items():
            assert dataset_bytes(path) == dataset_bytes(originals[uid])
    assert "fetch " + ct_series.study_uid + " done" in b.log()


@pytest.mark.slow
def test_get_of_a_study_held_elsewhere(gateway_factory, small_series, tmp_path):
    a, b = _pair(gateway_factory)
    assert storescu(a.host, a.port, a.ae_title, small_series.paths).ok
    wait_until(lambda: b.find_images(small_series.study_uid, small_series.series_uid),
               timeout=20, what="B knows the study")  # fmt: skip
    out = tmp_path / "got"
    out.mkdir()
    keys = ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={small_series.study_uid}",
            f"SeriesInstanceUID={small_series.series_uid}"]  # fmt: skip
    result = getscu(b.host, b.port, b.ae_title, keys, out, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    got = {sop_instance_uid(p): p for p in out.iterdir()}
    assert set(got) == set(small_series.sop_uids)


@pytest.mark.slow
def test_fetch_command_pulls_a_study_with_progress(gateway_factory, small_series, tmp_path):
    import subprocess
    import sys

    from gateway import REPO

    a, b = _pair(gateway_factory)
    assert storescu(a.host, a.port, a.ae_title, small_series.paths).ok
    wait_until(lambda: b.find_images(small_series.study_uid, small_series.series_uid),
               timeout=20, what="B knows the study")  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "appliance", "fetch", "--config", str(b.config_path),
         small_series.study_uid],
        capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (
        "100.0%" in run.stdout
        and f"{len(small_series.paths)}/{len(small_series.paths)}" in run.stdout
    )
    a.stop()  # B must now serve it alone
    out = tmp_path / "got"
    out.mkdir()
    keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={small_series.study_uid}"]
    assert getscu(b.host, b.port, b.ae_title, keys, out, timeout=60).returncode == 0
    assert len(list(out.iterdir())) == len(small_series.paths)
