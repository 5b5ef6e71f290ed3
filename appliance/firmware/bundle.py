"""Signed update bundles: build, verify, extract.

A bundle is a tar (optionally gzip) whose first two members are

    manifest.json   {"format": FORMAT, "version": "...", "kind": "tree" | "wheels",
                     "files": [{"path": "bin/dicomesh", "size": N, "sha256": "...",
                                "mode": 493}, ...]}
    manifest.sig    the raw 64-byte Ed25519 signature (RFC 8032) of manifest.json's bytes

followed by `payload/<path>` for every file of the manifest, regular files only. The
signature covers the manifest; the manifest pins each file's size and SHA-256. So one
signature check (before anything is written) plus a hash per file while it is extracted
authenticate every byte, in one streaming pass over a bundle that may not fit in memory.

Extraction goes into a fresh staging directory only; the caller moves it into a slot once
`extract` returned without error (appliance/firmware/update.py).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import posixpath
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.firmware import FirmwareError

FORMAT = "dicomesh-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
PAYLOAD = "payload/"
KINDS = ("tree", "wheels")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_FILES = 100_000
MAX_TOTAL_BYTES = 4 * 1024**3  # a whole venv is ~300 MB; beyond this is not an update
_CHUNK = 1024 * 1024


class BundleError(FirmwareError):
    """The bundle is not one we may install; nothing was changed."""


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    mode: int


@dataclass(frozen=True)
class Manifest:
    version: str
    kind: str
    files: tuple[FileEntry, ...]
    raw: bytes  # the signed bytes, kept in the slot for `status`

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        try:
            data = json.loads(raw)
            if data.get("format") != FORMAT:
                raise BundleError(f"unknown bundle format {data.get('format')!r}")
            files = tuple(
                FileEntry(
                    _safe_path(str(f["path"])), int(f["size"]), str(f["sha256"]), int(f["mode"])
                )
                for f in data["files"]
            )
            version, kind = str(data["version"]), str(data.get("kind", "tree"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BundleError(f"manifest is malformed ({type(exc).__name__}: {exc})") from None
        if kind not in KINDS:
            raise BundleError(f"unknown bundle kind {kind!r}")
        if len(files) > MAX_FILES or len({f.path for f in files}) != len(files):
            raise BundleError("manifest lists too many or duplicate files")
        if sum(f.size for f in files) > MAX_TOTAL_BYTES or any(f.size < 0 for f in files):
            raise BundleError("manifest sizes out of bounds")
        return cls(version, kind, files, raw)


def _safe_path(path: str) -> str:
    """A relative, normalised path that stays inside the slot (no '..', no absolute)."""
    norm = posixpath.normpath(path)
    if (
        not path
        or norm != path
        or norm.startswith(("/", "../"))
        or norm in (".", "..")
        or "\0" in path
    ):
        raise BundleError(f"unsafe path in manifest: {path!r}")
    return norm


# ---------------------------------------------------------------- keys


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise FirmwareError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A PEM public key, or the raw 32-byte key in base64 (one line)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FirmwareError(f"update key {path}: {exc.strerror or exc}") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(data.strip(), validate=True))
    except ValueError as exc:
        raise FirmwareError(f"update key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise FirmwareError(f"update key {path}: not an Ed25519 public key")
    return key


# ---------------------------------------------------------------- build


def build(
    source: Path, out: Path, key: Ed25519PrivateKey, version: str, kind: str = "tree"
) -> Manifest:
    """Bundle every regular file under `source` (symlinks are refused: a slot is plain files)."""
    if kind not in KINDS:
        raise FirmwareError(f"unknown bundle kind {kind!r}")
    entries = []
    for path in sorted(p for p in source.rglob("*") if not p.is_dir() or p.is_symlink()):
        if path.is_symlink() or not path.is_file():
            raise FirmwareError(f"{path}: only regular files can be bundled")
        entries.append(
            {
                "path": path.relative_to(source).as_posix(),
                "size": path.stat().st_size,
                "sha256": _sha256_file(path),
                "mode": 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644,
            }
        )
    raw = json.dumps(
        {"format": FORMAT, "version": version, "kind": kind, "files": entries},
        indent=1,
        sort_keys=True,
    ).encode()
    signature = key.sign(raw)
    tmp = out.with_name(f".{out.name}.tmp")
    mode = "w:gz" if out.name.endswith("gz") else "w"
    with tarfile.open(tmp, mode, format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, MANIFEST, raw)
        _add_bytes(tar, SIGNATURE, signature)
        for entry in entries:
            info = tar.gettarinfo(str(source / entry["path"]), PAYLOAD + entry["path"])
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with (source / entry["path"]).open("rb") as f:
                tar.addfile(info, f)
    os.replace(tmp, out)
    return Manifest.parse(raw)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- verify + extract


def _read_member(tar: tarfile.TarFile, expected: str, limit: int) -> bytes:
    member = tar.next()
    if member is None or member.name != expected or not member.isfile():
        raise BundleError(f"not a dicomesh bundle: {expected} must come first")
    if member.size > limit:
        raise BundleError(f"{expected} is too large")
    f = tar.extractfile(member)
    assert f is not None
    data = f.read()
    if len(data) != member.size:
        raise BundleError("bundle is truncated")
    return data


def extract(source: BinaryIO, public_key: Ed25519PublicKey, staging: Path) -> Manifest:
    """Verify the bundle read from `source` and write its payload into `staging` (created
    here, must not exist). Raises BundleError; on error `staging` may hold partial files and
    is the caller's to remove. The signature is checked before `staging` is created."""
    try:
        # Stream mode ("r|*"): one pass, no seeking; gzip or plain, detected.
        with tarfile.open(fileobj=source, mode="r|*") as tar:
            raw = _read_member(tar, MANIFEST, MAX_MANIFEST_BYTES)
            signature = _read_member(tar, SIGNATURE, 1024)
            try:
                public_key.verify(signature, raw)
            except InvalidSignature:
                raise BundleError("bad signature: bundle not signed by the update key") from None
            manifest = Manifest.parse(raw)
            staging.mkdir(mode=0o755)
            _extract_payload(tar, manifest, staging)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise BundleError(f"bundle is truncated or corrupt ({exc})") from None
    return manifest


def _extract_payload(tar: tarfile.TarFile, manifest: Manifest, staging: Path) -> None:
    expected = {f.path: f for f in manifest.files}
    seen: set[str] = set()
    # tar.next(), not iteration: iterating a stream-mode TarFile starts over at the members
    # already read (the manifest), which a stream cannot seek back to.
    while (member := tar.next()) is not None:
        if member.isdir():
            continue
        name = member.name.removeprefix(PAYLOAD) if member.name.startswith(PAYLOAD) else None
        entry = expected.get(name or "")
        if entry is None or not member.isfile():
            raise BundleError(f"bundle member {member.name!r} is not in the manifest")
        if name in seen or member.size != entry.size:
            raise BundleError(f"{name}: duplicate or size differs from the manifest")
        seen.add(entry.path)
        target = staging / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        f = tar.extractfile(member)
        assert f is not None
        digest = hashlib.sha256()
        written = 0
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                written += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if written != entry.size:
            raise BundleError("bundle is truncated")
        if digest.hexdigest() != entry.sha256:
            raise BundleError(f"{entry.path}: SHA-256 differs from the signed manifest")
        os.chmod(target, entry.mode & 0o755)
    missing = sorted(set(expected) - seen)
    if missing:
        raise BundleError(f"bundle is truncated: {len(missing)} files missing (first {missing[0]})")


def peek_manifest(source: BinaryIO) -> Manifest:
    """The manifest at the head of a bundle, NOT verified (to tell a peer which version we
    offer; whoever installs verifies). Reads only the first member. Raises BundleError."""
    try:
        with tarfile.open(fileobj=source, mode="r|*") as tar:
            return Manifest.parse(_read_member(tar, MANIFEST, MAX_MANIFEST_BYTES))
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise BundleError(f"bundle is truncated or corrupt ({exc})") from None


def read_manifest(path: Path) -> dict[str, Any] | None:
    """A slot's installed manifest (for status), None if absent or unreadable."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
