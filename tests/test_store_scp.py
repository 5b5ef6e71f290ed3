"""C-STORE into a real gateway: instances in many transfer syntaxes kept and served back as
received, bad data sets refused without losing the association, a full store, re-sends.

Raw bytes go on the wire through pynetdicom's `send_c_store(path)` with
STORE_SEND_CHUNKED_DATASET (see nodekit): the data set after the file meta is sent unchanged,
in a presentation context of exactly the file's transfer syntax.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dcmtk import echoscu, findscu, getscu, storescu
from dicomfiles import dataset_bytes, sop_instance_uid
from gateway import Gateway
from nodekit import (
    assert_same_bytes,
    assert_same_elements,
    association,
    by_sop_uid,
    c_get,
    identifier,
    raw_sending,
    running_gateway,
    transfer_syntax,
)
from pydicom.data import get_testdata_file
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)
from pynetdicom.dsutils import split_dataset
from studygen import SeriesInfo, generate_ct_series

pytestmark = pytest.mark.timeout(120)

SUCCESS = 0x0000
PENDING = 0xFF00
OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3 Refused: Out of Resources
DATASET_MISMATCH = 0xA900  # PS3.4 B.2.3 Error: Data Set does not match SOP Class
MISSING_INSTANCE_UID = 0xC001  # the gateway's code in the C000-CFFF "cannot understand" range
CANNOT_UNDERSTAND = range(0xC000, 0xD000)

# pydicom's sample files (in the installed pydicom, never downloaded) and their syntaxes.
SAMPLES = [
    ("SC_rgb_jpeg_dcmtk.dcm", JPEGBaseline8Bit),
    ("JPGExtended.dcm", JPEGExtended12Bit),
    ("SC_rgb_jpeg_gdcm.dcm", JPEGLosslessSV1),
    ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless),
    ("MR_small_jp2klossless.dcm", JPEG2000Lossless),
    ("JPEG2000.dcm", JPEG2000),
    ("MR_small_RLE.dcm", RLELossless),
    ("image_dfl.dcm", DeflatedExplicitVRLittleEndian),
    ("MR_small_bigendian.dcm", ExplicitVRBigEndian),
    ("MR_small_implicit.dcm", ImplicitVRLittleEndian),
]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory, "store-gw") as gateway:
        yield gateway


def _sample(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    assert found is not None, f"{name} is not among pydicom's installed test files"
    return Path(found)


def _with_own_uid(src: Path, dst: Path, number: int) -> Path:
    """A copy of `src` with a SOP Instance UID of its own, edited in place in the bytes (same
    length, so nothing is re-encoded): several MR_small_* samples share one UID."""
    raw = src.read_bytes()
    meta, _ = split_dataset(src)
    if UID(meta.TransferSyntaxUID).is_deflated:  # its UID is unique, and inside zlib data
        dst.write_bytes(raw)
        return dst
    old = str(meta.MediaStorageSOPInstanceUID)
    head, _, last = old.rpartition(".")
    assert len(last) >= 4 and last[0] != "0", old
    new = f"{head}.{last[0]}{number:0{len(last) - 1}d}"
    assert len(new) == len(old) and new != old
    assert raw.count(old.encode()) == 2, "the UID should be in the file meta and the data set"
    dst.write_bytes(raw.replace(old.encode(), new.encode()))
    return dst


# -- transfer syntaxes ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "syntax"), SAMPLES, ids=[n for n, _ in SAMPLES])
def test_instance_comes_back_in_its_own_syntax_unchanged(
    gw: Gateway, tmp_path: Path, name: str, syntax: str
) -> None:
    number = [n for n, _ in SAMPLES].index(name) + 1
    path = _with_own_uid(_sample(name), tmp_path / name, number)
    assert transfer_syntax(path) == syntax
    header = pydicom.dcmread(path, stop_before_pixels=True)
    sop_class, uid = str(header.SOPClassUID), str(header.SOPInstanceUID)

    with raw_sending(), association(gw, [(sop_class, [syntax])]) as assoc:
        assert int(assoc.send_c_store(path).Status) == SUCCESS

    query = identifier(
        QueryRetrieveLevel="IMAGE",
        StudyInstanceUID=header.StudyInstanceUID,
        SeriesInstanceUID=header.SeriesInstanceUID,
        SOPInstanceUID=uid,
    )
    statuses, received = c_get(gw, query, [(sop_class, [syntax])])
    assert [int(s.Status) for s in statuses] == [PENDING, SUCCESS]
    assert statuses[-1].NumberOfCompletedSuboperations == 1
    assert received.syntaxes == {uid: syntax}
    sent = dataset_bytes(path)
    assert len(received.datasets[uid]) == len(sent)
    assert received.datasets[uid] == sent


# -- bad input ------------------------------------------------------------------------------


def _bad_files(src: list[Path], outdir: Path) -> list[Path]:
    """Four refusable files made from four valid slices (each keeps its file meta, so the
    C-STORE-RQ names the slice's SOP Class and Instance UIDs)."""
    outdir.mkdir()
    _, offset = split_dataset(src[0])
    noise = src[0].read_bytes()[:offset] + np.random.default_rng(7).bytes(4096)
    (outdir / "noise.dcm").write_bytes(noise)

    # Written as read (enforce_file_format=False): pydicom would otherwise make the file
    # meta agree with the data set, and the C-STORE-RQ is built from the file meta.
    ds = pydicom.dcmread(src[1])
    del ds.SOPInstanceUID
    ds.save_as(outdir / "no_sop_uid.dcm", enforce_file_format=False)

    ds = pydicom.dcmread(src[2])
    ds.SOPClassUID = MRImageStorage  # the request (file meta) still says CT
    ds.save_as(outdir / "class_mismatch.dcm", enforce_file_format=False)

    raw = src[3].read_bytes()
    (outdir / "truncated.dcm").write_bytes(raw[:-1000])  # Pixel Data is last: cut short
    files = [
        outdir / f"{name}.dcm" for name in ("noise", "no_sop_uid", "class_mismatch", "truncated")
    ]
    for path, source in zip(files, src, strict=True):
        meta, _ = split_dataset(path)
        assert meta.MediaStorageSOPClassUID == CTImageStorage, path.name
        assert meta.MediaStorageSOPInstanceUID == sop_instance_uid(source), path.name
    return files


def test_bad_data_sets_are_refused_and_the_association_goes_on(gw: Gateway, tmp_path: Path) -> None:
    series = generate_ct_series(tmp_path / "src", 8, rows=64, cols=64, seed=301)
    bad = _bad_files(series.paths[:4], tmp_path / "bad")
    good = series.paths[4:]
    sequence = [item for pair in zip(bad, good, strict=True) for item in pair]

    with raw_sending(), association(gw, [(CTImageStorage, [ExplicitVRLittleEndian])]) as assoc:
        statuses = []
        for path in sequence:
            statuses.append(int(assoc.send_c_store(path).Status))
        assert assoc.is_established

    noise, good0, no_uid, good1, mismatch, good2, truncated, good3 = statuses
    assert noise in CANNOT_UNDERSTAND, hex(noise)
    assert no_uid == MISSING_INSTANCE_UID, hex(no_uid)
    assert mismatch == DATASET_MISMATCH, hex(mismatch)
    assert truncated in CANNOT_UNDERSTAND, hex(truncated)
    assert [good0, good1, good2, good3] == [SUCCESS] * 4

    assert _image_uids(gw, series) == sorted(series.sop_uids[4:])


# -- re-sending ---------------------------------------------------------------------------------


def _study_counts(gw: Gateway, study_uid: str) -> list[tuple[int, int]]:
    rsp = findscu(
        gw.host,
        gw.port,
        gw.ae_title,
        [
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={study_uid}",
            "NumberOfStudyRelatedInstances",
            "NumberOfStudyRelatedSeries",
        ],
    )
    return [(int(r.NumberOfStudyRelatedInstances), int(r.NumberOfStudyRelatedSeries)) for r in rsp]


def _image_uids(gw: Gateway, series: SeriesInfo) -> list[str]:
    return sorted(
        str(r.SOPInstanceUID) for r in gw.find_images(series.study_uid, series.series_uid)
    )


def test_resending_a_series_is_idempotent(gw: Gateway, small_series: SeriesInfo) -> None:
    n = len(small_series.paths)
    for attempt in (1, 2):
        run = storescu(gw.host, gw.port, gw.ae_title, small_series.paths)
        assert [status for _, status in run.results] == [SUCCESS] * n, f"send {attempt}"
        assert _image_uids(gw, small_series) == sorted(small_series.sop_uids), f"send {attempt}"
        assert _study_counts(gw, small_series.study_uid) == [(n, 1)], f"send {attempt}"


# -- full store ------------------------------------------------------------------------------------


def test_full_store_refuses_with_a700_and_keeps_serving(
    gateway_factory: Callable[..., Gateway], ct_series: SeriesInfo, tmp_path: Path
) -> None:
    quota = 3 * 1024 * 1024
    gw = gateway_factory(store={"max_bytes": "3 MiB", "min_free_bytes": 0})
    run = storescu(gw.host, gw.port, gw.ae_title, ct_series.paths, extra=("-nh",))

    statuses = [status for _, status in run.results]
    assert len(statuses) == len(ct_series.paths), run.stderr
    stored = statuses.count(SUCCESS)
    # Early slices fit, then every later one is refused: the quota never lets one back in.
    assert statuses == [SUCCESS] * stored + [OUT_OF_RESOURCES] * (len(statuses) - stored)
    size = len(dataset_bytes(ct_series.paths[0]))  # 525 KB, each slice the same
    assert stored * size <= quota, "more data kept than the quota allows"
    assert stored >= 3, "refused long before the quota was reached"
    acked = sorted(sop_instance_uid(p) for p, status in run.results if status == SUCCESS)

    assert gw.proc is not None and gw.proc.poll() is None
    assert echoscu(gw.host, gw.port, gw.ae_title).returncode == 0
    assert _image_uids(gw, ct_series) == acked
    proc = getscu(
        gw.host,
        gw.port,
        gw.ae_title,
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={ct_series.study_uid}",
            f"SeriesInstanceUID={ct_series.series_uid}",
        ],
        tmp_path / "get",
        extra=("+B",),
    )
    assert proc.returncode == 0, proc.stderr
    received = by_sop_uid(sorted((tmp_path / "get").iterdir()))
    assert sorted(received) == acked
    originals = dict(zip(ct_series.sop_uids, ct_series.paths, strict=True))
    for uid, path in received.items():
        assert_same_elements(path, originals[uid])
        assert_same_bytes(path, originals[uid])

    full_lines = [line for line in gw.log().splitlines() if "store full" in line]
    assert len(full_lines) == 1, full_lines
    assert " ERROR " in full_lines[0]
