"""Building received instances for store tests, and an independent audit of a store's state.

Instances are real DICOM data sets (Explicit VR Little Endian, as a C-STORE carries them: no
file meta) encoded by pydicom in memory and passed through `ingest.prepare`, so the store sees
exactly what the DICOM handler will give it. `audit` re-derives every counter, reference
count and link from the raw LMDB tables and reports each disagreement.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
)

from appliance.dicom import ingest
from appliance.store import IncomingInstance, Manifest, Store
from appliance.store.errors import CorruptData
from appliance.store.records import patient_key

CT = CTImageStorage
MR = MRImageStorage
US = UltrasoundImageStorage
SC = SecondaryCaptureImageStorage
TS = ExplicitVRLittleEndian
CALLING_AE = "MODALITY1"
_ROOT = "1.2.826.0.1.3680043.8.498"  # pydicom's example root
REF = struct.Struct("<IB")  # chunk_refs value: refcount u32, codec u8 (see index.py)


def uid(*parts: int) -> str:
    """A UID whose length depends only on the number of parts (each part < 900000)."""
    return ".".join([_ROOT, *(str(100000 + p) for p in parts)])


def noise(n: int, seed: int = 0) -> bytes:
    """`n` incompressible bytes, deterministic from `seed`."""
    return np.random.default_rng(seed).bytes(n)


def smooth(n: int, seed: int = 0) -> bytes:
    """`n` bytes of slowly varying 16-bit samples (zstd shrinks them a lot)."""
    samples = (np.arange(n // 2 + 1, dtype=np.uint32) // 64 + seed) % 4096
    return samples.astype("<u2").tobytes()[:n]


@dataclass(frozen=True)
class Item:
    """One instance as received (bytes) and as the store gets it (IncomingInstance)."""

    raw: bytes
    inc: IncomingInstance

    @property
    def uid(self) -> str:
        return self.inc.manifest.sop_instance_uid

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.raw).digest()


def encode(
    *,
    sop_uid: str,
    series_uid: str,
    study_uid: str,
    patient_id: str = "PAT-0001",
    patient_name: str = "DOE^JANE",
    sop_class: str = CT,
    modality: str = "CT",
    payload: bytes = b"\0" * 64,
    instance_number: int = 1,
) -> bytes:
    """A data set's bytes in Explicit VR Little Endian; the payload is its Pixel Data (OB)."""
    if len(payload) % 2:
        raise ValueError("Pixel Data must have an even length")
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240115"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = modality
    ds.StudyDescription = "STORE TEST"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.PixelData = payload
    ds["PixelData"].VR = "OB"
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def build(*, compress: bool = False, calling_ae: str = CALLING_AE, **fields: object) -> Item:
    """Encode a data set (see `encode`) and prepare it as the C-STORE handler does."""
    raw = encode(**fields)  # type: ignore[arg-type]
    sop_class = str(fields.get("sop_class", CT))
    inc = ingest.prepare(raw, TS, sop_class, str(fields["sop_uid"]), calling_ae, compress=compress)
    return Item(raw, inc)


def resend(item: Item, calling_ae: str = CALLING_AE) -> Item:
    """The same bytes received again (a modality retrying after a lost C-STORE response)."""
    m = item.inc.manifest
    return Item(item.raw, ingest.prepare(item.raw, TS, m.sop_class_uid, item.uid, calling_ae))


def pkey(patient_id: str) -> str:
    """The store's key of a patient without an issuer."""
    return patient_key(patient_id, "")


def audit(store: Store) -> list[str]:
    """Every inconsistency between the store's tables; [] for a sound store. Reads all data."""
    problems: list[str] = []
    t = store.db.tables
    with store.reader() as r:
        txn = r.txn

        def rows(db: object) -> list[tuple[bytes, bytes]]:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]

        instances = {i.uid: i for i in r.all_instances()}
        manifests = {k.decode(): Manifest.decode(v) for k, v in rows(t.manifests)}
        if set(manifests) != set(instances):
            problems.append(
                f"manifests without instance {sorted(set(manifests) - set(instances))}, "
                f"instances without manifest {sorted(set(instances) - set(manifests))}"
            )
        expected_refs: Counter[bytes] = Counter()
        for m in manifests.values():
            expected_refs.update(c.digest for c in m.chunks)
        # Chunks pinned by swarm downloads in progress hold a reference each too.
        expected_refs.update(digest for _study, digest in rows(t.download_pins))
        refs = {k: REF.unpack(v)[0] for k, v in rows(t.chunk_refs)}
        chunk_keys = {k for k, _ in rows(t.chunks)}
        if refs != dict(expected_refs):
            problems.append(f"chunk_refs {len(refs)} entries disagree with manifests")
        if chunk_keys != set(expected_refs):
            problems.append(
                f"{len(chunk_keys - set(expected_refs))} orphan chunk(s), "
                f"{len(set(expected_refs) - chunk_keys)} missing chunk(s)"
            )
        for sop, inst in instances.items():
            m = manifests.get(sop)
            if m is None:
                continue
            if (m.size, m.sha256) != (inst.size, inst.sha256):
                problems.append(f"instance {sop}: record and manifest disagree")
            if sum(c.size for c in m.chunks) != m.size:
                problems.append(f"instance {sop}: chunk sizes do not sum to its size")
            try:
                data = r.instance_bytes(sop)
            except CorruptData as exc:
                problems.append(str(exc))
            else:
                if data is None or hashlib.sha256(data).digest() != inst.sha256:
                    problems.append(f"instance {sop}: bytes do not verify")

        series = {s.uid: s for s in r.all_series()}
        studies = {s.uid: s for s in r.studies()}
        patients = {p.key: p for p in r.patients()}

        def pairs(db: object) -> set[tuple[str, str]]:
            return {(k.decode(), v.decode()) for k, v in rows(db)}

        links = {
            "series_instances": (
                pairs(t.series_instances),
                {(i.series_uid, i.uid) for i in instances.values()},
            ),
            "study_series": (
                pairs(t.study_series),
                {(s.study_uid, s.uid) for s in series.values()},
            ),
            "patient_studies": (
                pairs(t.patient_studies),
                {(s.patient_key, s.uid) for s in studies.values()},
            ),
        }
        for name, (found, wanted) in links.items():
            if found != wanted:
                problems.append(f"{name}: extra {found - wanted}, missing {wanted - found}")
        for i in instances.values():
            s = series.get(i.series_uid)
            if s is None or s.study_uid != i.study_uid:
                problems.append(f"instance {i.uid}: series {i.series_uid} missing or elsewhere")
        for s in series.values():
            kids = [i for i in instances.values() if i.series_uid == s.uid]
            if (s.n_instances, s.bytes) != (len(kids), sum(i.size for i in kids)):
                problems.append(f"series {s.uid}: counters {s.n_instances}/{s.bytes} wrong")
            if s.study_uid not in studies:
                problems.append(f"series {s.uid}: study {s.study_uid} missing")
        for st in studies.values():
            kids_se = [s for s in series.values() if s.study_uid == st.uid]
            kids_in = [i for i in instances.values() if i.study_uid == st.uid]
            modalities = Counter(str(s.attrs.get("Modality") or "") for s in kids_se)
            classes = Counter(i.sop_class_uid for i in kids_in)
            if (st.n_series, st.n_instances, st.bytes, st.modalities, st.sop_classes) != (
                len(kids_se),
                len(kids_in),
                sum(i.size for i in kids_in),
                dict(modalities),
                dict(classes),
            ):
                problems.append(f"study {st.uid}: counters wrong")
            if st.patient_key not in patients:
                problems.append(f"study {st.uid}: patient missing")
        for p in patients.values():
            kids_st = [s for s in studies.values() if s.patient_key == p.key]
            n_se = sum(s.n_series for s in kids_st)
            n_in = sum(s.n_instances for s in kids_st)
            if (p.n_studies, p.n_series, p.n_instances) != (len(kids_st), n_se, n_in):
                problems.append(f"patient {p.key}: counters wrong")
            if not kids_st:
                problems.append(f"patient {p.key}: no studies")
        usage = {k.decode() for k, _ in rows(t.usage)}
        if usage != set(studies):
            problems.append(f"usage records {sorted(usage ^ set(studies))} do not match studies")
        counts = r.counts()
        actual = {
            "patients": len(patients),
            "studies": len(studies),
            "series": len(series),
            "instances": len(instances),
            "chunks": len(chunk_keys),
        }
        if counts != actual:
            problems.append(f"counts() {counts} != {actual}")
    return problems
