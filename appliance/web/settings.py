"""Settings changed on the page: validated with the TOML schema, written into the config
file atomically (the file stays the truth, and shows the change), then applied.

Only the section being changed is rewritten; the other tables stay as they were. TOML
comments in the file are not kept (the file is re-serialised), which the page says.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from appliance.fileutil import atomic_write, locked
from appliance.schema import ConfigError, dump, load

T = TypeVar("T")


def read_file(path: Path) -> dict[str, Any]:
    """The config file as TOML data ({} when it does not exist yet)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror or exc}"]) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: {exc}"]) from exc


def validate_section(cls: type[T], section: str, data: Any) -> T:
    """`data` as section `cls`; ConfigError with every problem, keys as in the file."""
    return load(cls, data, section)  # a non-table is reported as such, with its key


def check_whole(path: Path, section: str, value: Any) -> None:
    """ConfigError if the file with `section` replaced would not load as a whole (checks that
    span sections). Blocking (reads the file)."""
    from appliance.config import Config  # the whole schema; config.py imports web.config

    data = read_file(path)
    data[section] = dump(value, mask_secrets=False)
    load(Config, data)


def write_section(path: Path, section: str, value: Any) -> None:
    """Replace table `section` of the config file with `value` (a validated dataclass)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.with_name(f".{path.name}.lock")):
        data = read_file(path)
        data[section] = dump(value, mask_secrets=False)
        atomic_write(path, tomli_w.dumps(data).encode())
