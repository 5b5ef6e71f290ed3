"""WireGuard keys: made and kept by the gateway (X25519, one per uplink tunnel).

Private keys live in `state_dir/wireguard/<uplink>.key` (base64, mode 0600, directory 0700)
and never appear in a log line or a repr; only public keys are shown.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from appliance.fileutil import atomic_write
from appliance.net.errors import NetError

KEYS_DIR = "wireguard"


@dataclass(frozen=True)
class KeyPair:
    """A WireGuard key pair; the private half is hidden from repr."""

    private: bytes = field(repr=False)
    public: bytes

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        if len(private) != 32:
            raise NetError("a WireGuard private key is 32 bytes")
        key = X25519PrivateKey.from_private_bytes(private)
        return cls(private, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    @classmethod
    def generate(cls) -> KeyPair:
        # cryptography clamps the scalar itself (RFC 7748 section 5), as `wg genkey` does.
        return cls.from_private(X25519PrivateKey.generate().private_bytes_raw())

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public).decode()


def key_path(state_dir: Path, uplink: str) -> Path:
    return state_dir / KEYS_DIR / f"{uplink}.key"


def load_or_create(state_dir: Path, uplink: str) -> KeyPair:
    """The key pair of `uplink`'s tunnel, generated and stored on first use."""
    path = key_path(state_dir, uplink)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pair = KeyPair.generate()
        atomic_write(path, base64.b64encode(pair.private) + b"\n", mode=0o600)
        return pair
    except (OSError, UnicodeDecodeError) as exc:
        raise NetError(f"cannot read WireGuard key {path}: {exc}") from None
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)  # someone loosened it: a private key is for the gateway only
    try:
        return KeyPair.from_private(base64.b64decode(text, validate=True))
    except (ValueError, NetError):
        raise NetError(f"{path}: not a base64 WireGuard private key") from None


def public_key(state_dir: Path, uplink: str) -> str | None:
    """The stored public key of `uplink`'s tunnel (base64), or None if not generated yet."""
    try:
        text = key_path(state_dir, uplink).read_text(encoding="ascii").strip()
        return KeyPair.from_private(base64.b64decode(text, validate=True)).public_b64
    except (OSError, ValueError, NetError):
        return None
