"""kill -9 at random moments while a modality sends: whatever was acknowledged survives
intact, and nothing half-stored ever becomes visible."""

from __future__ import annotations

import random
import threading

import pytest
from dcmtk import StoreRun, findscu, getscu, storescu
from dicomfiles import dataset_bytes, sop_instance_uid
from gateway import Gateway
from studygen import generate_ct_series

ROUNDS = 6


@pytest.mark.slow
def test_acknowledged_instances_survive_kill9(tmp_path):
    series = generate_ct_series(tmp_path / "series", 80, rows=256, cols=256, seed=21)
    by_uid = {sop_instance_uid(p): p for p in series.paths}
    gw = Gateway(tmp_path / "gw")
    rng = random.Random(20261122)  # reproducible kill moments
    acknowledged: set[str] = set()
    refused: list[int | None] = []
    try:
        for _ in range(ROUNDS):
            gw.start()
            runs: list[StoreRun] = []

            def send(into: list[StoreRun] = runs) -> None:
                into.append(storescu(gw.host, gw.port, gw.ae_title, series.paths, timeout=120))

            sender = threading.Thread(target=send)
            sender.start()
            # The kill moment is the experiment's variable, not a synchronisation.
            threading.Event().wait(rng.uniform(0.02, 0.6))
            gw.kill9()
            sender.join(timeout=120)
            assert not sender.is_alive()
            for path, status in runs[0].results:
                if status == 0x0000:
                    acknowledged.add(sop_instance_uid(path))
                elif status is not None:
                    refused.append(status)
        assert not refused, f"unexpected refusals {refused}"
        assert acknowledged, "no instance was acknowledged before the kills; widen the delays"

        gw.start()
        found = gw.find_images(series.study_uid, series.series_uid)
        visible = {str(ds.SOPInstanceUID) for ds in found}
        assert acknowledged <= visible
        assert visible <= set(by_uid)

        study = findscu(
            gw.host,
            gw.port,
            gw.ae_title,
            [
                "QueryRetrieveLevel=STUDY",
                f"StudyInstanceUID={series.study_uid}",
                "NumberOfStudyRelatedInstances",
            ],
        )
        assert int(study[0].NumberOfStudyRelatedInstances) == len(visible)

        out = tmp_path / "retrieved"
        out.mkdir()
        getscu(
            gw.host,
            gw.port,
            gw.ae_title,
            ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={series.study_uid}"],
            out,
        )
        retrieved = {sop_instance_uid(p): p for p in out.iterdir()}
        assert set(retrieved) == visible
        for uid, path in retrieved.items():
            assert dataset_bytes(path) == dataset_bytes(by_uid[uid]), uid
    finally:
        gw.stop()
