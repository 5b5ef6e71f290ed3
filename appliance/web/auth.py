"""The admin account: first-boot setup code, password hash (scrypt), both files 0600 in the
state directory. Blocking (the KDF takes ~0.1 s and 32 MiB by design): call from an executor.

Why scrypt: memory-hard (RFC 7914), in the standard library (no native dependency to build
on the Pi), and its cost parameters travel with each hash so they can be raised later.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from appliance.fileutil import atomic_write

log = logging.getLogger(__name__)

ACCOUNT_FILE = "web-admin.json"
SETUP_CODE_FILE = "setup-code"
MIN_PASSWORD_CHARS = 10
MAX_PASSWORD_CHARS = 1024  # the KDF input is hashed once; this only bounds request work

# scrypt cost: N=2**15, r=8, p=1 uses 128*r*N = 32 MiB and ~0.1 s on an x86 core, ~0.4 s on
# a Pi 4: cheap for one admin, expensive for a guesser holding a stolen hash file.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_DKLEN = 32
SALT_BYTES = 16
_MAXMEM = 64 * 1024 * 1024  # above the 32 MiB the parameters need (OpenSSL's default is 32)

# Setup codes: 12 characters of an alphabet without look-alikes (0/O, 1/I/L), ~58 bits.
_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
_CODE_CHARS = 12


class AuthError(Exception):
    """A setup or password request that cannot be honoured; str() is safe to show."""


@dataclass(frozen=True)
class PasswordHash:
    """One stored scrypt hash with the parameters it was made with."""

    salt: bytes
    digest: bytes
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    @classmethod
    def make(cls, password: str) -> PasswordHash:
        salt = os.urandom(SALT_BYTES)
        return cls(salt, _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P))

    def verify(self, password: str) -> bool:
        candidate = _scrypt(password, self.salt, self.n, self.r, self.p)
        return hmac.compare_digest(candidate, self.digest)

    def to_json(self) -> dict[str, object]:
        return {
            "kdf": "scrypt",
            "n": self.n,
            "r": self.r,
            "p": self.p,
            "salt": base64.b64encode(self.salt).decode(),
            "hash": base64.b64encode(self.digest).decode(),
        }

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> PasswordHash:
        if obj.get("kdf") != "scrypt":
            raise ValueError("unknown kdf")
        return cls(
            salt=base64.b64decode(str(obj["salt"])),
            digest=base64.b64decode(str(obj["hash"])),
            n=int(obj["n"]),  # type: ignore[call-overload]
            r=int(obj["r"]),  # type: ignore[call-overload]
            p=int(obj["p"]),  # type: ignore[call-overload]
        )


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=SCRYPT_DKLEN
    )


def check_password_rules(password: object) -> str:
    """The password if acceptable; AuthError naming the rule otherwise."""
    if not isinstance(password, str):
        raise AuthError("password: must be a string")
    if len(password) < MIN_PASSWORD_CHARS:
        raise AuthError(f"password: at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise AuthError(f"password: at most {MAX_PASSWORD_CHARS} characters")
    return password


def new_setup_code() -> str:
    code = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(_CODE_CHARS))
    return "-".join(code[i : i + 4] for i in range(0, _CODE_CHARS, 4))


def _normalise_code(code: str) -> str:
    """Codes are typed by people: case, spaces and dashes do not matter."""
    return "".join(c for c in code.upper() if c.isalnum())


class Account:
    """The single admin account of this gateway, kept in the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.account_path = state_dir / ACCOUNT_FILE
        self.code_path = state_dir / SETUP_CODE_FILE
        self._hash: PasswordHash | None = None

    @property
    def configured(self) -> bool:
        return self._load() is not None

    def _load(self) -> PasswordHash | None:
        if self._hash is None:
            try:
                self._hash = PasswordHash.from_json(json.loads(self.account_path.read_text()))
            except FileNotFoundError:
                return None
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # A damaged file must not open the gateway: stay locked, say how to recover.
                log.error(
                    "admin account file %s unreadable (%s); delete it to get a new setup code",
                    self.account_path, type(exc).__name__,
                )  # fmt: skip
                return PasswordHash(b"", b"\x00" * SCRYPT_DKLEN)
        return self._hash

    def ensure_setup_code(self) -> str | None:
        """First boot (no password yet): make the one-time setup code if there is none.
        Returns the code only when it was just made (so it is logged exactly once)."""
        if self.configured:
            self.code_path.unlink(missing_ok=True)
            return None
        if self.code_path.exists():
            return None
        code = new_setup_code()
        atomic_write(self.code_path, (code + "\n").encode(), mode=0o600)
        return code

    def setup(self, code: object, password: object) -> None:
        """Set the first password, authorised by the setup code, which is then void."""
        if self.configured:
            raise AuthError("already set up: log in instead")
        try:
            expected = self.code_path.read_text().strip()
        except FileNotFoundError:
            raise AuthError("no setup code: restart the gateway to make one") from None
        if not isinstance(code, str) or not hmac.compare_digest(
            _normalise_code(code).encode(), _normalise_code(expected).encode()
        ):
            raise AuthError("setup code: wrong code")
        self._store(PasswordHash.make(check_password_rules(password)))
        self.code_path.unlink(missing_ok=True)

    def verify(self, password: object) -> bool:
        stored = self._load()
        if stored is None or not isinstance(password, str) or len(password) > MAX_PASSWORD_CHARS:
            return False
        return stored.verify(password)

    def change(self, current: object, new: object) -> None:
        if not self.verify(current):
            raise AuthError("current password: wrong password")
        self._store(PasswordHash.make(check_password_rules(new)))

    def _store(self, hashed: PasswordHash) -> None:
        atomic_write(self.account_path, json.dumps(hashed.to_json()).encode(), mode=0o600)
        self._hash = hashed
