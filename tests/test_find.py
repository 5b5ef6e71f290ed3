"""C-FIND against a real gateway with findscu (pynetdicom where a status must be read):
Patient Root and Study Root at every level, PS3.4 C.2.2.2 matching, computed keys.

One gateway per module holds a fixed data set; no test here stores anything, so the tests
may share it. Expected values are written out, not derived from the gateway.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from dcmtk import findscu, storescu
from gateway import Gateway
from nodekit import c_find, identifier, running_gateway
from pydicom.multival import MultiValue
from pydicom.uid import CTImageStorage, MRImageStorage
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from studygen import SeriesInfo, generate_ct_series

pytestmark = pytest.mark.timeout(120)

AE_TITLE = "DMESH_QR"  # not the default, so RetrieveAETitle must come from the config
QR_FAILURE_IDENTIFIER_MISMATCH = 0xA900  # PS3.4 C.4.1.1.4

PATIENTS = {
    "A": {"PatientName": "DOE^JANE", "PatientID": "PAT-A", "PatientSex": "F"},
    "B": {"PatientName": "Smith^John", "PatientID": "PAT-B", "PatientSex": "M"},
    "C": {"PatientName": "Muller^Jurgen", "PatientID": "PAT-C", "PatientSex": "M"},
}
MULLER = "Müller^Jürgen"  # patient C's real name, written in UTF-8 (ISO_IR 192)
# study key -> (patient, seed, StudyDate, its series as (modality, number of slices))
STUDIES = {
    "A1": ("A", 101, "20240110", (("CT", 2), ("MR", 3))),
    "A2": ("A", 102, "20240220", (("MR", 1), ("CT", 2))),
    "B1": ("B", 103, "20240305", (("CT", 1), ("MR", 2))),
    "B2": ("B", 104, "20231120", (("CT", 3), ("CT", 1))),  # CT only: for ModalitiesInStudy
    "C1": ("C", 105, "20220601", (("CT", 1),)),
}
ALL_STUDIES = sorted(STUDIES)
ALL_PATIENTS = ["PAT-A", "PAT-B", "PAT-C"]


@dataclass(frozen=True)
class Study:
    key: str
    uid: str
    series: tuple[tuple[str, SeriesInfo], ...]  # (modality, series)


@dataclass(frozen=True)
class QueryData:
    gw: Gateway
    studies: dict[str, Study]

    def key_of(self, study_uid: str) -> str:
        return next(k for k, s in self.studies.items() if s.uid == study_uid)


# CT Image Module attributes (PS3.3 C.8.2.1) the generator writes; an MR image has none.
CT_ONLY_KEYWORDS = (
    "KVP",
    "XRayTubeCurrent",
    "ConvolutionKernel",
    "DataCollectionDiameter",
    "ReconstructionDiameter",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
)


def _make_mr(paths: list[Path]) -> None:
    """Turn generated CT slices into MR Image Storage instances (MR Image Module keys)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.Modality = "MR"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.SeriesDescription = "T1 SE AXIAL"
        for keyword in CT_ONLY_KEYWORDS:
            delattr(ds, keyword)
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "20"
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = "1.5"
        ds.save_as(path, enforce_file_format=True)


def _make_utf8(paths: list[Path]) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = MULLER
        ds.save_as(path, enforce_file_format=True)
        assert MULLER.encode() in path.read_bytes()  # UTF-8 in the file


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueryData]:
    root = tmp_path_factory.mktemp("find-data")
    studies: dict[str, Study] = {}
    for key, (patient, seed, date, series_plan) in STUDIES.items():
        study = {"date": date, "accession": f"ACC-{key}", "description": f"STUDY {key}"}
        series: list[tuple[str, SeriesInfo]] = []
        for number, (modality, slices) in enumerate(series_plan, start=1):
            info = generate_ct_series(
                root / key,
                slices,
                rows=64,
                cols=64,
                seed=seed,
                study=study,
                patient=PATIENTS[patient],
                series_number=number,
            )
            if modality == "MR":
                _make_mr(info.paths)
            if patient == "C":
                _make_utf8(info.paths)
            series.append((modality, info))
        studies[key] = Study(key, series[0][1].study_uid, tuple(series))
    with running_gateway(tmp_path_factory, "find-gw", ae_title=AE_TITLE) as gw:
        paths = [p for s in studies.values() for _, info in s.series for p in info.paths]
        run = storescu(gw.host, gw.port, gw.ae_title, paths)
        assert run.ok, run.stderr
        assert len(run.results) == 16
        yield QueryData(gw, studies)


def find(data: QueryData, level: str, *keys: str, model: str = "study") -> list[pydicom.Dataset]:
    gw = data.gw
    return findscu(gw.host, gw.port, gw.ae_title, [f"QueryRetrieveLevel={level}", *keys], model)


def study_keys(data: QueryData, responses: list[pydicom.Dataset]) -> list[str]:
    return sorted(data.key_of(str(r.StudyInstanceUID)) for r in responses)


def values(elem_value: object) -> list[str]:
    """A possibly multi-valued element as a list of strings."""
    if isinstance(elem_value, MultiValue | list):
        return [str(v) for v in elem_value]
    return [str(elem_value)] if elem_value not in (None, "") else []


# -- PATIENT level (Patient Root) -------------------------------------------------------------


def test_patient_level_lists_patients_with_their_counts(data: QueryData) -> None:
    rsp = find(
        data,
        "PATIENT",
        "PatientID",
        "PatientName",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
        model="patient",
    )
    got = {
        str(r.PatientID): (
            str(r.PatientName),
            int(r.NumberOfPatientRelatedStudies),
            int(r.NumberOfPatientRelatedSeries),
            int(r.NumberOfPatientRelatedInstances),
        )
        for r in rsp
    }
    assert len(rsp) == 3
    assert got == {
        "PAT-A": ("DOE^JANE", 2, 4, 8),
        "PAT-B": ("Smith^John", 2, 4, 7),
        "PAT-C": (MULLER, 1, 1, 1),
    }
    assert all(r.QueryRetrieveLevel == "PATIENT" for r in rsp)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("DOE^JANE", ["PAT-A"]),  # single value
        ("doe^jane", ["PAT-A"]),  # PN matching ignores case
        ("DOE", []),  # "^" is part of the value: no prefix match without a wild card
        ("smith*", ["PAT-B"]),
        ("S?ITH^J?HN", ["PAT-B"]),
        ("*^J*", ALL_PATIENTS),
        ("m?ller*", ["PAT-C"]),  # "?" is one character, also a non-ASCII one
        ("*", ALL_PATIENTS),  # universal
        ("", ALL_PATIENTS),  # zero length: universal
    ],
)
def test_patient_name_matching(data: QueryData, name: str, expected: list[str]) -> None:
    rsp = find(data, "PATIENT", f"PatientName={name}", "PatientID", model="patient")
    assert sorted(str(r.PatientID) for r in rsp) == expected


# -- STUDY level --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("PatientID=PAT-A", ["A1", "A2"]),
        ("AccessionNumber=ACC-B1", ["B1"]),
        ("AccessionNumber=acc-b1", []),  # LO/SH single value matching is case-sensitive
        ("PatientName=smith*", ["B1", "B2"]),
        ("StudyDescription=STUDY ?2", ["A2", "B2"]),
        ("StudyDate=20240220", ["A2"]),
        ("StudyDate=20240101-20240228", ["A1", "A2"]),  # A-B
        ("StudyDate=20240220-20240305", ["A2", "B1"]),  # both bounds inclusive
        ("StudyDate=-20231231", ["B2", "C1"]),  # -B
        ("StudyDate=20240301-", ["B1"]),  # A-
        ("StudyDate=20240111-20240219", []),
        ("StudyInstanceUID=", ALL_STUDIES),  # universal
        ("ModalitiesInStudy=MR", ["A1", "A2", "B1"]),
        ("ModalitiesInStudy=CT", ALL_STUDIES),
        ("ModalitiesInStudy=US", []),
    ],
)
def test_study_level_matching(data: QueryData, key: str, expected: list[str]) -> None:
    rsp = find(data, "STUDY", key, "StudyInstanceUID")
    assert study_keys(data, rsp) == expected


def test_study_uid_list_matching(data: QueryData) -> None:
    a1, b2 = data.studies["A1"].uid, data.studies["B2"].uid
    rsp = find(data, "STUDY", f"StudyInstanceUID={a1}\\{b2}", "StudyDate")
    assert study_keys(data, rsp) == ["A1", "B2"]
    assert {str(r.StudyInstanceUID): str(r.StudyDate) for r in rsp} == {
        a1: "20240110",
        b2: "20231120",
    }


EXPECTED_STUDY_COUNTS = {  # instances, series, ModalitiesInStudy
    "A1": (5, 2, ["CT", "MR"]),
    "A2": (3, 2, ["CT", "MR"]),
    "B1": (3, 2, ["CT", "MR"]),
    "B2": (4, 2, ["CT"]),
    "C1": (1, 1, ["CT"]),
}


@pytest.mark.parametrize("model", ["study", "patient"])
def test_study_level_counts_and_modalities(data: QueryData, model: str) -> None:
    keys = [
        "StudyInstanceUID",
        "NumberOfStudyRelatedInstances",
        "NumberOfStudyRelatedSeries",
        "ModalitiesInStudy",
    ]
    if model == "study":
        rsp = find(data, "STUDY", *keys)
    else:  # Patient Root: studies below one patient (PS3.4 C.6.1.1.3)
        rsp = [
            r
            for pid in ALL_PATIENTS
            for r in find(data, "STUDY", f"PatientID={pid}", *keys, model="patient")
        ]
    got = {
        data.key_of(str(r.StudyInstanceUID)): (
            int(r.NumberOfStudyRelatedInstances),
            int(r.NumberOfStudyRelatedSeries),
            values(r.ModalitiesInStudy),
        )
        for r in rsp
    }
    assert len(rsp) == 5
    assert got == EXPECTED_STUDY_COUNTS


def test_unsupported_and_lower_level_keys_come_back_empty(data: QueryData) -> None:
    rsp = find(
        data,
        "STUDY",
        f"StudyInstanceUID={data.studies['A1'].uid}",
        "RequestingPhysician",
        "SeriesDescription",
        "StudyDescription",
    )
    assert len(rsp) == 1
    (r,) = rsp
    # (0032,1032) is no key we keep, SeriesDescription lives below the STUDY level.
    assert "RequestingPhysician" in r and r["RequestingPhysician"].is_empty
    assert "SeriesDescription" in r and r["SeriesDescription"].is_empty
    assert r.StudyDescription == "STUDY A1"


# -- SERIES and IMAGE levels ----------------------------------------------------------------------


def _parent_keys(data: QueryData, study: str, model: str) -> list[str]:
    patient = PATIENTS[STUDIES[study][0]]["PatientID"]
    keys = [f"StudyInstanceUID={data.studies[study].uid}"]
    return [f"PatientID={patient}", *keys] if model == "patient" else keys


@pytest.mark.parametrize("model", ["study", "patient"])
def test_series_level_lists_series_with_counts(data: QueryData, model: str) -> None:
    rsp = find(
        data,
        "SERIES",
        *_parent_keys(data, "A1", model),
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
        model=model,
    )
    (_, ct), (_, mr) = data.studies["A1"].series
    got = {
        str(r.SeriesInstanceUID): (
            str(r.Modality),
            int(r.SeriesNumber),
            int(r.NumberOfSeriesRelatedInstances),
        )
        for r in rsp
    }
    assert len(rsp) == 2
    assert got == {ct.series_uid: ("CT", 1, 2), mr.series_uid: ("MR", 2, 3)}


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Modality=MR", [("B1", 2)]),
        ("Modality=CT", [("B1", 1)]),
        ("SeriesNumber=2", [("B1", 2)]),
    ],
)
def test_series_level_matching(data: QueryData, key: str, expected: list[tuple[str, int]]) -> None:
    rsp = find(data, "SERIES", *_parent_keys(data, "B1", "study"), key, "SeriesInstanceUID")
    series = data.studies["B1"].series
    assert [str(r.SeriesInstanceUID) for r in rsp] == [
        series[number - 1][1].series_uid for _, number in expected
    ]


def test_series_uid_list_matching(data: QueryData) -> None:
    (_, ct1), (_, ct2) = data.studies["B2"].series
    rsp = find(
        data,
        "SERIES",
        *_parent_keys(data, "B2", "study"),
        f"SeriesInstanceUID={ct2.series_uid}\\{ct1.series_uid}",
        "NumberOfSeriesRelatedInstances",
    )
    got = {str(r.SeriesInstanceUID): int(r.NumberOfSeriesRelatedInstances) for r in rsp}
    assert got == {ct1.series_uid: 3, ct2.series_uid: 1}


@pytest.mark.parametrize("model", ["study", "patient"])
def test_image_level_lists_instances(data: QueryData, model: str) -> None:
    _, mr = data.studies["A1"].series[1]
    rsp = find(
        data,
        "IMAGE",
        *_parent_keys(data, "A1", model),
        f"SeriesInstanceUID={mr.series_uid}",
        "SOPInstanceUID",
        "InstanceNumber",
        "SOPClassUID",
        model=model,
    )
    got = sorted((int(r.InstanceNumber), str(r.SOPInstanceUID), str(r.SOPClassUID)) for r in rsp)
    assert got == [(n, uid, MRImageStorage) for n, uid in enumerate(mr.sop_uids, start=1)]


def test_image_level_single_value_matching(data: QueryData) -> None:
    _, ct = data.studies["B2"].series[0]
    rsp = find(
        data,
        "IMAGE",
        *_parent_keys(data, "B2", "study"),
        f"SeriesInstanceUID={ct.series_uid}",
        "InstanceNumber=2",
        "SOPInstanceUID",
        "SOPClassUID",
    )
    assert [(str(r.SOPInstanceUID), str(r.SOPClassUID)) for r in rsp] == [
        (ct.sop_uids[1], CTImageStorage)
    ]


# -- response-only keys, errors, character sets -------------------------------------------------


@pytest.mark.parametrize(
    ("model", "level", "study", "count"),
    [
        ("patient", "PATIENT", None, 3),
        ("study", "STUDY", None, 5),
        ("study", "SERIES", "A2", 2),
        ("study", "IMAGE", "A2", 3),
        ("patient", "IMAGE", "A2", 3),
    ],
)
def test_retrieve_ae_title_is_the_gateway(
    data: QueryData, model: str, level: str, study: str | None, count: int
) -> None:
    keys = _parent_keys(data, study, model) if study else []
    if level == "IMAGE":
        keys.append("SeriesInstanceUID")
    rsp = find(data, level, *keys, "RetrieveAETitle", model=model)
    assert [str(r.RetrieveAETitle) for r in rsp] == [AE_TITLE] * count


def test_patient_level_in_study_root_is_refused(data: QueryData) -> None:
    query = identifier(QueryRetrieveLevel="PATIENT", PatientID="", PatientName="")
    assert c_find(data.gw, query, StudyRootQueryRetrieveInformationModelFind) == [
        (QR_FAILURE_IDENTIFIER_MISMATCH, None)
    ]


@pytest.mark.parametrize("name", [MULLER, "müller^jürgen", "*JÜRGEN", "Mü*"])
def test_non_ascii_patient_name_in_utf8(data: QueryData, name: str) -> None:
    rsp = find(
        data,
        "PATIENT",
        "SpecificCharacterSet=ISO_IR 192",
        f"PatientName={name}",
        "PatientID",
        model="patient",
    )
    assert [(str(r.PatientID), str(r.PatientName)) for r in rsp] == [("PAT-C", MULLER)]
    assert rsp[0].SpecificCharacterSet == "ISO_IR 192"
    # The answer is encoded in UTF-8 on the wire, not merely decodable by pydicom.
    assert rsp[0]["PatientName"].value.original_string == MULLER.encode()


def test_non_ascii_patient_found_from_study_root(data: QueryData) -> None:
    rsp = find(
        data,
        "STUDY",
        "SpecificCharacterSet=ISO_IR 192",
        "PatientName=müller*",
        "PatientID",
        "StudyInstanceUID",
    )
    assert [(str(r.PatientID), study_keys(data, [r])[0]) for r in rsp] == [("PAT-C", "C1")]
    assert str(rsp[0].PatientName) == MULLER
