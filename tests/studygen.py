"""Synthetic but realistic CT studies: body-phantom pixels, full CT Image IOD headers.

Deterministic: the same ``seed`` (and series number) gives the same UIDs and pixels; other
seeds give other UIDs. Used by tests (a few 64x64 slices) and bench/ (~1 GB of 512x512).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

# Pixel encoding: unsigned 12-bit stored values, HU = stored + RescaleIntercept (slope 1).
BITS_STORED = 12
RESCALE_INTERCEPT = -1024
MAX_STORED = (1 << BITS_STORED) - 1
FOV_MM = 360.0  # reconstruction diameter; PixelSpacing = FOV_MM / cols, whatever the matrix

DEFAULT_PATIENT: dict[str, str] = {
    "PatientName": "PHANTOM^SYNTHETIC",
    "PatientID": "DCMESH-TEST-0001",
    "PatientBirthDate": "19700101",
    "PatientSex": "O",
}

_UID_NAMESPACE = "dicomesh-studygen"


@dataclass(frozen=True)
class StudySpec:
    """Study-level values shared by every series of one study."""

    uid: str
    date: str = "20240115"
    time: str = "093000"
    accession: str = "ACC0001"
    description: str = "CT CHEST ABDOMEN SYNTHETIC"
    study_id: str = "1"

    @classmethod
    def for_seed(cls, seed: int) -> StudySpec:
        """Default study for ``seed``: deterministic UID and accession number."""
        uid = generate_uid(entropy_srcs=[_UID_NAMESPACE, "study", str(seed)])
        return cls(uid=uid, accession=f"ACC{seed:07d}"[-16:], study_id=str(seed % 100000))


@dataclass(frozen=True)
class SeriesInfo:
    """What generate_ct_series wrote: files sorted by InstanceNumber, and their UIDs."""

    paths: list[Path]
    study_uid: str
    series_uid: str
    sop_uids: list[str]
    total_bytes: int
    series_number: int = 1


@dataclass(frozen=True)
class StudyInfo:
    """What generate_study wrote: one study made of several CT series."""

    study_uid: str
    series: list[SeriesInfo] = field(default_factory=list)
    total_bytes: int = 0

    @property
    def paths(self) -> list[Path]:
        """All files of the study, series by series."""
        return [p for s in self.series for p in s.paths]

    @property
    def sop_uids(self) -> list[str]:
        """All SOPInstanceUIDs of the study, series by series."""
        return [u for s in self.series for u in s.sop_uids]


def _study_spec(study: StudySpec | Mapping[str, str] | None, seed: int) -> StudySpec:
    if study is None:
        return StudySpec.for_seed(seed)
    if isinstance(study, StudySpec):
        return study
    values = dict(study)
    if "uid" not in values:
        values["uid"] = StudySpec.for_seed(seed).uid
    return StudySpec(**values)


class _Phantom:
    """Vectorised body phantom on a fixed pixel grid; ``slice_hu(t)`` for t in [0, 1]."""

    def __init__(self, rows: int, cols: int, spacing: float) -> None:
        # Patient coordinates (mm) of pixel centres, LPS: +x patient left, +y posterior.
        x = (np.arange(cols, dtype=np.float32) - (cols - 1) / 2) * spacing
        y = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * spacing
        self.x = x[np.newaxis, :]
        self.y = y[:, np.newaxis]
        self.outside_fov = (self.x**2 + self.y**2) > (FOV_MM / 2) ** 2

    def _ellipse(self, cx: float, cy: float, a: float, b: float) -> np.ndarray:
        return ((self.x - cx) / a) ** 2 + ((self.y - cy) / b) ** 2 <= 1.0

    def slice_hu(self, t: float) -> np.ndarray:
        """Noise-free HU image at relative z ``t`` (0 = inferior end, 1 = superior end)."""
        hu = np.full(self.outside_fov.shape, -1000.0, dtype=np.float32)  # air
        breath = 1.0 + 0.03 * math.sin(2 * math.pi * t)
        a, b = 165.0 * breath, 115.0 * breath
        hu[self._ellipse(0, 0, a, b)] = -90.0  # subcutaneous fat
        hu[self._ellipse(0, 0, a - 12, b - 12)] = 40.0  # muscle / soft tissue
        # Liver (patient right = -x), large at the inferior end, gone by mid-stack.
        liver = max(0.0, 1.0 - t / 0.45)
        if liver > 0.05:
            hu[self._ellipse(-55, 5, 85 * liver**0.5, 65 * liver**0.5)] = 60.0
        # Lungs grow from the bases to mid-chest and shrink towards the apices.
        lung = max(0.0, math.sin(math.pi * min(1.0, max(0.0, (t - 0.15) / 0.85))))
        if lung > 0.05:
            la, lb = 55 * lung**0.6, 80 * lung**0.6
            hu[self._ellipse(-70, -5, la, lb)] = -820.0
            hu[self._ellipse(72, -5, la * 0.92, lb)] = -800.0
        # Heart, left-anterior, in the middle third.
        heart = max(0.0, 1.0 - abs(t - 0.5) / 0.2)
        if heart > 0.05:
            hu[self._ellipse(25, -25, 55 * heart**0.5, 45 * heart**0.5)] = 45.0
        hu[self._ellipse(15, 32, 13, 13)] = 180.0  # contrast-filled aorta
        # Vertebra: body, posterior arch, spinal canal.
        hu[self._ellipse(0, 62, 20, 17)] = 700.0
        hu[self._ellipse(0, 90, 26, 11)] = 650.0
        hu[self._ellipse(0, 85, 8, 8)] = 25.0
        return hu


def _pixel_bytes(
    hu: np.ndarray, noise: np.ndarray, outside: np.ndarray, big_endian: bool
) -> np.ndarray:
    stored = np.rint(hu + noise - RESCALE_INTERCEPT)
    np.clip(stored, 0, MAX_STORED, out=stored)
    stored[outside] = 0  # outside the reconstruction circle: padding, -1024 HU
    return stored.astype(">u2" if big_endian else "<u2")


def _base_dataset(
    spec: StudySpec,
    patient: Mapping[str, str],
    series_uid: str,
    frame_uid: str,
    series_number: int,
    rows: int,
    cols: int,
    spacing: float,
    thickness: float,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = spec.date
    ds.StudyTime = spec.time
    ds.SeriesTime = spec.time
    ds.AccessionNumber = spec.accession
    ds.Modality = "CT"
    ds.Manufacturer = "DICOMESH SYNTHETIC"
    ds.ManufacturerModelName = "Body Phantom"
    ds.InstitutionName = "Test Clinic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = spec.description
    ds.SeriesDescription = f"AXIAL {thickness:g}mm"
    for keyword, value in {**DEFAULT_PATIENT, **patient}.items():
        setattr(ds, keyword, value)
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{thickness:g}"
    ds.KVP = "120"
    ds.DataCollectionDiameter = f"{FOV_MM:g}"
    ds.ReconstructionDiameter = f"{FOV_MM:g}"
    ds.XRayTubeCurrent = 200
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = spec.uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = spec.study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def generate_ct_series(
    outdir: Path,
    n_slices: int,
    *,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    study: StudySpec | Mapping[str, str] | None = None,
    patient: Mapping[str, str] | None = None,
    series_number: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
    slice_thickness: float = 1.25,
    noise_sigma: float = 15.0,
) -> SeriesInfo:
    """Write ``n_slices`` CT Image Storage files of one axial series into ``outdir``.

    Files are named ``CT{series:03d}_{instance:05d}.dcm``, so several series can share a
    directory. ``study`` is a StudySpec or a dict of its fields (default: derived from seed);
    ``patient`` maps DICOM keywords (PatientName, PatientID, ...) over DEFAULT_PATIENT.
    Compressed transfer syntaxes go through ``Dataset.compress`` (needs an encoder plugin).
    """
    if n_slices < 1:
        raise ValueError("n_slices must be >= 1")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    spec = _study_spec(study, seed)
    ts = UID(transfer_syntax)
    spacing = FOV_MM / cols
    entropy = [_UID_NAMESPACE, spec.uid, str(seed), str(series_number)]
    series_uid = generate_uid(entropy_srcs=[*entropy, "series"])
    frame_uid = generate_uid(entropy_srcs=[*entropy, "frame"])

    ds = _base_dataset(
        spec,
        patient or {},
        series_uid,
        frame_uid,
        series_number,
        rows,
        cols,
        spacing,
        slice_thickness,
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta

    phantom = _Phantom(rows, cols, spacing)
    rng = np.random.default_rng([seed, series_number])
    x0 = -(cols - 1) / 2 * spacing
    y0 = -(rows - 1) / 2 * spacing
    z0 = -(n_slices - 1) / 2 * slice_thickness
    start_s = _seconds(spec.time)
    paths: list[Path] = []
    sop_uids: list[str] = []
    total = 0
    for i in range(n_slices):
        t = i / (n_slices - 1) if n_slices > 1 else 0.5
        z = z0 + i * slice_thickness
        noise = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(noise_sigma)
        pixels = _pixel_bytes(
            phantom.slice_hu(t), noise, phantom.outside_fov, ts == ExplicitVRBigEndian
        )
        sop_uid = generate_uid(entropy_srcs=[*entropy, "sop", str(i)])
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{z:.4f}"]
        ds.SliceLocation = f"{z:.4f}"
        acq = _hhmmss(start_s + 60 + i * 0.1)
        ds.AcquisitionTime = ds.ContentTime = acq
        if ts.is_compressed:
            ds.compress(ts, pixels.astype(np.uint16), generate_instance_uid=False)
        else:
            ds.PixelData = pixels.tobytes()
            ds["PixelData"].VR = "OW"
        path = outdir / f"CT{series_number:03d}_{i + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        sop_uids.append(sop_uid)
        total += path.stat().st_size
    return SeriesInfo(paths, spec.uid, series_uid, sop_uids, total, series_number)


def generate_study(
    outdir: Path,
    *,
    target_bytes: int,
    seed: int = 0,
    rows: int = 512,
    cols: int = 512,
    slices_per_series: tuple[int, int] = (200, 400),
    study: StudySpec | Mapping[str, str] | None = None,
    patient: Mapping[str, str] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    max_series: int = 100,
) -> StudyInfo:
    """Write CT series of one study into ``outdir`` until at least ``target_bytes`` are on disk.

    Series lengths are drawn (deterministically from ``seed``) in ``slices_per_series``; the
    last series is cut short so the study overshoots the target by less than one slice.
    """
    spec = _study_spec(study, seed)
    rng = np.random.default_rng([seed, 0xD1C0])
    lo, hi = slices_per_series
    per_slice = rows * cols * 2 + 2048  # estimate until the first series is measured
    series: list[SeriesInfo] = []
    total = 0
    while total < target_bytes and len(series) < max_series:
        wanted = int(rng.integers(lo, hi + 1))
        needed = max(1, math.ceil((target_bytes - total) / per_slice))
        info = generate_ct_series(
            outdir,
            min(wanted, needed),
            rows=rows,
            cols=cols,
            seed=seed,
            study=spec,
            patient=patient,
            series_number=len(series) + 1,
            transfer_syntax=transfer_syntax,
        )
        series.append(info)
        total += info.total_bytes
        per_slice = max(1, info.total_bytes // len(info.paths))
    return StudyInfo(spec.uid, series, total)


def _seconds(hhmmss: str) -> float:
    return int(hhmmss[0:2]) * 3600 + int(hhmmss[2:4]) * 60 + float(hhmmss[4:] or 0)


def _hhmmss(seconds: float) -> str:
    seconds %= 86400
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{int(h):02d}{int(m):02d}{s:09.6f}"
