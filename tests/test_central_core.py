"""The central broker's I/O-free parts: config, shares, merging and projecting answers,
catalog summaries of central studies and how the catalog and store show them; the order of
a replica's retrieval (C-MOVE requests, its early announcement) with stand-ins for the PACS."""

from __future__ import annotations

import asyncio
import json
import threading

import asynckit
import pytest
import storekit as kit
from pydicom.dataset import Dataset

from appliance.central import core
from appliance.central.config import CentralConfig
from appliance.config import ConfigError, load_config
from appliance.dicom import query
from appliance.mesh.catalog_model import CatalogEntry, merge_view
from appliance.mesh.describe import holding
from appliance.store import Store
from appliance.store.config import StoreConfig


def test_config_defaults_and_errors():
    cfg = load_config(None, {"central.enabled": True, "central.port": 4242})
    assert cfg.central.talks_directly("replica") and not cfg.central.talks_directly("clinic")
    assert cfg.central.origin("gw-a") == "pacs-gw-a"
    assert CentralConfig().origin("x" * 32) == "pacs-" + "x" * 27
    with pytest.raises(ConfigError) as err:
        load_config(None, {"central.roles": ["pacs"], "central.ae_title": "",
                           "central.catalog_origin": "Bad Name", "central.stall_s": 0})  # fmt: skip
    with pytest.raises(ConfigError, match=r"central.enabled: needs \[mesh\] enabled"):
        load_config(None, {"central.enabled": True, "mesh.enabled": False})
    text = str(err.value)
    for key in ("central.roles[0]", "central.ae_title", "central.catalog_origin",
                "central.stall_s"):  # fmt: skip
        assert key in text


def _listing(n: int) -> list[core.ListedInstance]:
    return [core.ListedInstance(f"1.2.3.{i}", f"1.2.9.{i % 3}", "1.2.840.10008.5.1.4.1.1.2")
            for i in range(n)]  # fmt: skip


def test_shares_split_every_instance_once_the_same_everywhere():
    listing = sorted(_listing(10), key=lambda i: (i.series, i.sop))
    a = core.shares(listing, ["r2", "r1", "r3"])
    b = core.shares(list(listing), ["r3", "r1", "r2", "r1"])
    assert a == b  # any gateway, any order: the same split
    sops = [i.sop for part in a.values() for i in part]
    assert sorted(sops) == sorted(i.sop for i in listing)
    assert sorted(len(p) for p in a.values()) == [3, 3, 4]
    assert core.shares(listing, []) == {}


def _answer(**keys) -> Dataset:
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def test_merge_drops_what_is_local_and_duplicates():
    seen = {"1.1"}
    answers = [_answer(StudyInstanceUID=u) for u in ("1.1", "1.2", "1.2", "1.3")]
    merged = core.merge(seen, answers, "STUDY")
    assert [ds.StudyInstanceUID for ds in merged] == ["1.2", "1.3"]
    assert seen == {"1.1", "1.2", "1.3"}


def test_project_answers_exactly_the_requested_keys():
    request = _answer(QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientName="",
                      RetrieveAETitle="", InstanceAvailability="", StudyDate="")  # fmt: skip
    q = query.parse(request, "study")
    central = _answer(StudyInstanceUID="1.2", PatientName="Müller^Jörg", RetrieveAETitle="PACS",
                      AccessionNumber="A1", StudyDate="20240101")  # fmt: skip
    out = core.project(q, central, "CLINIC")
    assert out.RetrieveAETitle == "CLINIC" and out.InstanceAvailability == "NEARLINE"
    assert out.StudyInstanceUID == "1.2" and out.StudyDate == "20240101"
    assert "AccessionNumber" not in out  # not asked for
    assert out.SpecificCharacterSet == "ISO_IR 192"


def test_wire_round_trip_and_bad_input():
    ds = _answer(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2", PatientName="A^B")
    back = core.from_wire(json.loads(json.dumps(core.to_wire(ds))))
    assert back.StudyInstanceUID == "1.2" and str(back.PatientName) == "A^B"
    assert core.answers_from_wire({"answers": [core.to_wire(ds), "junk", {"x": 1}]})[0] == back
    with pytest.raises(core.CentralInputError):
        core.answers_from_wire([])
    with pytest.raises(core.CentralInputError):
        core.retrieve_request_from_wire({"study": "1.2", "instances": [{"sop": "a b"}], "of": 1})
    with pytest.raises(core.CentralInputError):
        core.retrieve_request_from_wire({"study": "1.2", "instances": [], "of": 10**9})
    study, wanted, total = core.retrieve_request_from_wire(
        {"study": "1.2", "instances": [i.to_wire() for i in _listing(2)], "of": 5}
    )
    assert (study, len(wanted), total) == ("1.2", 2, 5)


def test_summary_is_listed_by_the_catalog_and_ranks_below_descriptions():
    answer = _answer(
        StudyInstanceUID="1.2.5", PatientID="P1", PatientName="A^B", StudyDate="20240101",
        ModalitiesInStudy=["CT", "SR"], NumberOfStudyRelatedSeries="2",
        NumberOfStudyRelatedInstances="40",
    )  # fmt: skip
    changes = core.summary(answer)
    entries = [CatalogEntry("pacs-r1", kind, uid, seq, payload).validate()
               for seq, (kind, uid, payload) in enumerate(changes, 1)]  # fmt: skip
    view = merge_view("1.2.5", entries)
    assert not view.described  # nothing to swarm: no instances
    patient, study, series, instances = view.records()
    assert (study.n_series, study.n_instances, series, instances) == (2, 40, [], [])
    assert sorted(study.modalities) == ["CT", "SR"] and patient.attrs["PatientID"] == "P1"
    assert query.value_of(study, "NumberOfStudyRelatedInstances") == "40"
    assert view.holders["pacs-r1"] == {"state": "complete", "instances": 40, "of": 40, "bytes": 0}
    # A replica describing real instances wins the attributes.
    desc = {"patient_key": "k", "patient": {"PatientID": "P1"}, "study": {"StudyDate": "2023"},
            "series": {"1.9": {}}, "instances": {"1.9.1": {
                "series": "1.9", "sop_class": "1.2", "ts": "1.2.840.10008.1.2.1", "size": 1,
                "manifest": "0" * 64, "attrs": {}}}}  # fmt: skip
    view = merge_view("1.2.5", [*entries, CatalogEntry("r1", "desc", "1.2.5", 1, desc)])
    assert view.described and view.study == {"StudyDate": "2023"}
    assert core.summary(_answer(PatientID="P1")) == []  # no study UID


def test_holding_of_a_study_filling_from_the_central_pacs(tmp_path):
    store = Store(StoreConfig(min_free_bytes=0), tmp_path / "store")
    try:
        study, series = kit.uid(1), kit.uid(2)
        item = kit.build(sop_uid=kit.uid(3), series_uid=series, study_uid=study)
        store.put_instance(item.inc)
        with store.reader() as r:
            assert holding(r, study)["state"] == "complete"
        store.submit_download(study, json.dumps({"expect": 12}).encode()).result(10)
        with store.reader() as r:
            assert holding(r, study) == {"state": "partial", "instances": 1, "of": 12,
                                         "bytes": item.inc.manifest.size}  # fmt: skip
    finally:
        store.close()


class _MoveAssociation:
    """Stands in for a pynetdicom association with the central PACS: every C-MOVE request
    succeeds with one completed sub-operation per SOP Instance UID asked for."""

    def __init__(self) -> None:
        self.is_established = True
        self.requests: list[list[str]] = []

    def send_c_move(self, ds, _destination, _context):
        sops = ds.SOPInstanceUID
        self.requests.append([sops] if isinstance(sops, str) else list(sops))
        status = Dataset()
        status.Status = 0x0000
        status.NumberOfCompletedSuboperations = len(self.requests[-1])
        status.NumberOfFailedSuboperations = 0
        yield status, None

    def release(self) -> None:
        self.is_established = False


def test_first_move_request_asks_for_one_instance_then_whole_batches():
    from appliance.central.scu import CentralSCU

    scu = CentralSCU(CentralConfig(enabled=True, move_batch=3), "REPL1", "REPL1")
    assoc = _MoveAssociation()
    scu._associate = lambda _context, _timeout: assoc
    after: list[int] = []
    pairs = [("1.2.3", f"1.2.4.{i}") for i in range(5)] + [("1.2.5", "1.2.6.1")]
    assert scu.move("1.2.1", pairs, lambda done, _failed: after.append(done)) == (6, 0)
    assert [len(r) for r in assoc.requests] == [1, 3, 1, 1]
    assert after == [1, 4, 5, 6]
    assert not assoc.is_established


def test_replica_announces_its_holding_while_the_rest_of_its_share_is_moving():
    from appliance.central.broker import CentralBroker

    announced = threading.Event()
    seen: list[bool] = []

    class SCU:
        stopping = False

        def move(self, _study, pairs, on_batch):  # the broker's move thread
            on_batch(1, 0)
            seen.append(announced.wait(5))  # the loop announces while we are still moving
            for n in range(2, len(pairs) + 1):
                on_batch(n, 0)
            return len(pairs), 0

    calls: list[str] = []
    running = [0, 0]  # now, at most

    async def announce(study: str) -> None:
        calls.append(study)
        running[0] += 1
        running[1] = max(running)
        await asyncio.sleep(0.02)  # a publication takes a while: later batches pile up
        running[0] -= 1
        announced.set()

    async def body() -> None:
        broker = CentralBroker(SCU(), None, None, "pacs-r1", on_arrived=announce)
        todo = [core.ListedInstance(f"1.2.4.{i}", "1.2.3", "") for i in range(4)]
        await broker._retrieve("1.2.1", todo)
        while broker._tasks:
            await asyncio.sleep(0.01)
        await broker.stop()

    asynckit.run(body())
    assert seen == [True]
    # The first instance, then what came meanwhile: coalesced, one call at a time.
    assert set(calls) == {"1.2.1"} and 2 <= len(calls) <= 4
    assert running[1] == 1


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the wildcards asked with
def test_single_study_only_for_a_query_of_exactly_one_uid():
    def ask(**keys) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        for name, value in keys.items():
            setattr(ds, name, value)
        return ds

    uid = "1.2.826.0.1.3680043.8.498.1"
    assert core.single_study(ask(StudyInstanceUID=uid, PatientID="", StudyDate="")) == uid
    # Wildcards, lists, no UID, or another key narrowing the match: an empty answer to
    # these does not say the study is gone.
    assert core.single_study(ask(StudyInstanceUID="1.2.826.*")) is None
    assert core.single_study(ask(StudyInstanceUID="1.2.8?6.1")) is None
    assert core.single_study(ask(StudyInstanceUID=[uid, "1.2.3"])) is None
    assert core.single_study(ask(StudyInstanceUID="")) is None
    assert core.single_study(ask(StudyInstanceUID=uid, StudyDate="20260101")) is None
