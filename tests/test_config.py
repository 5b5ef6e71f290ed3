"""Typed config: schema engine (appliance.schema) and the root config (appliance.config)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from appliance import schema
from appliance.config import Config, LogConfig, load_config, render_toml
from appliance.dicom.config import DicomConfig, DicomNode
from appliance.schema import ByteSize, ConfigError, Secret, setting
from appliance.store.config import StoreConfig

AE_MSG = (
    "must be 1-16 characters of the DICOM default repertoire, "
    "no backslash or control characters (PS3.5 AE)"
)

CONTRACT = """\
state_dir = "/var/lib/dicomesh"
[dicom]
ae_title = "DICOMESH"        # 1-16 chars, PS3.5 AE rules
port = 11112
allowed_calling = []         # empty = accept any calling AE title
[[dicom.nodes]]              # known remote nodes (C-MOVE destinations, forwarding targets)
ae_title = "WS1"
host = "127.0.0.1"
port = 11113
[store]
max_bytes = 0                # 0 = no limit besides the disk
"""


def write(tmp_path: Path, text: str, name: str = "dicomesh.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of_path(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    return excinfo.value.errors


def errors_of(tmp_path: Path, text: str) -> list[str]:
    return errors_of_path(write(tmp_path, text))


# ---------------------------------------------------------------------------- happy paths


def test_contract_example_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, CONTRACT))
    assert cfg.state_dir == Path("/var/lib/dicomesh")
    assert cfg.dicom.ae_title == "DICOMESH"
    assert cfg.dicom.port == 11112
    assert cfg.dicom.allowed_calling == []
    assert cfg.dicom.nodes == [DicomNode(ae_title="WS1", host="127.0.0.1", port=11113)]
    assert cfg.store.max_bytes == 0
    assert isinstance(cfg.store.max_bytes, ByteSize)


def test_defaults() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.state_dir == Path("/var/lib/dicomesh")
    assert cfg.log == LogConfig(level="info")
    d = cfg.dicom
    assert (d.ae_title, d.port, d.listen) == ("DICOMESH", 11112, "0.0.0.0")
    assert d.allowed_calling == [] and d.nodes == []
    assert d.strict_called_ae is True
    assert (d.max_pdu, d.max_associations) == (0, 32)
    assert (d.acse_timeout_s, d.dimse_timeout_s, d.network_timeout_s) == (30.0, 120.0, 120.0)
    assert d.shutdown_grace_s == 10.0
    assert cfg.store == StoreConfig(
        max_bytes=ByteSize(0),
        min_free_bytes=ByteSize(256 * 2**20),
        compression="off",
        commit_timeout_s=60.0,
    )


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


def test_list_defaults_are_not_shared() -> None:
    assert DicomConfig().nodes is not DicomConfig().nodes


def test_int_accepted_for_float(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[dicom]\nacse_timeout_s = 5\n"))
    assert cfg.dicom.acse_timeout_s == 5.0
    assert type(cfg.dicom.acse_timeout_s) is float


def test_every_setting_has_a_doc() -> None:
    docs = schema.describe(Config)
    assert ("dicom.nodes[].host", "host name or IP address of the node") in docs
    assert [key for key, doc in docs if not doc] == []


# ---------------------------------------------------------------------------- errors


def test_every_error_reported_at_once(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """\
        state_dri = "/srv"
        [log]
        level = "inof"
        [dicom]
        ae_titel = "X"
        port = "abc"
        [[dicom.nodes]]
        ae_title = "WS1"
        port = 104
        [[dicom.nodes]]
        ae_title = "WS2"
        host = "ws2.local"
        port = 70000
        [store]
        max_bytes = "lots"
        """,
    )
    assert errors == [
        "state_dri: unknown key (did you mean 'state_dir'?)",
        "log.level: expected one of 'debug', 'info', 'warning', 'error', got string 'inof'"
        " (did you mean 'info'?)",
        "dicom.ae_titel: unknown key (did you mean 'ae_title'?)",
        "dicom.port: expected an integer, got string 'abc'",
        "dicom.nodes[0].host: required",
        "dicom.nodes[1].port: must be 1-65535",
        "store.max_bytes: invalid byte size 'lots': expected a number with an optional unit "
        "B, kB, MB, GB, TB, KiB, MiB, GiB or TiB",
    ]


def test_config_error_is_value_error_joined_by_newlines() -> None:
    err = ConfigError(["a: x", "b: y"])
    assert isinstance(err, ValueError)
    assert str(err) == "a: x\nb: y"
    assert err.errors == ["a: x", "b: y"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('state_dri = "/x"', "state_dri: unknown key (did you mean 'state_dir'?)"),
        ("[dicom]\nae_titel = 'A'", "dicom.ae_titel: unknown key (did you mean 'ae_title'?)"),
        ("[dicom]\nzzzzzz = 1", "dicom.zzzzzz: unknown key"),
        ("[stor]\nmax_bytes = 0", "stor: unknown key (did you mean 'store'?)"),
        (
            "[[dicom.nodes]]\nae_title='A'\nhost='h'\nport=1\nhots='h'",
            "dicom.nodes[0].hots: unknown key (did you mean 'host'?)",
        ),
    ],
)
def test_unknown_key(tmp_path: Path, text: str, expected: str) -> None:
    assert errors_of(tmp_path, text) == [expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[dicom]\nport = true", "dicom.port: expected an integer, got boolean true"),
        ("[dicom]\nport = 104.0", "dicom.port: expected an integer, got float 104.0"),
        (
            "[dicom]\nstrict_called_ae = 1",
            "dicom.strict_called_ae: expected a boolean, got integer 1",
        ),
        (
            "[dicom]\nstrict_called_ae = 'yes'",
            "dicom.strict_called_ae: expected a boolean, got string 'yes'",
        ),
        (
            "[dicom]\nacse_timeout_s = false",
            "dicom.acse_timeout_s: expected a number, got boolean false",
        ),
        (
            "[dicom]\nacse_timeout_s = nan",
            "dicom.acse_timeout_s: expected a finite number, got float nan",
        ),
        ("[store]\nmax_bytes = true", "store.max_bytes: expected a byte size, got boolean true"),
        ("[store]\nmax_bytes = 1.5", "store.max_bytes: expected a byte size, got float 1.5"),
        ("state_dir = 5", "state_dir: expected a path string, got integer 5"),
        ("state_dir = 'var/lib'", "state_dir: must be an absolute path"),
    ],
)
def test_type_strictness(tmp_path: Path, text: str, expected: str) -> None:
    assert errors_of(tmp_path, text) == [expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dicom = 5", "dicom: expected a table, got integer 5"),
        ("[dicom.port]\nx = 1", "dicom.port: expected an integer, got table"),
        ("[dicom]\nnodes = 'WS1'", "dicom.nodes: expected an array, got string 'WS1'"),
        ("[dicom]\nnodes = ['WS1']", "dicom.nodes[0]: expected a table, got string 'WS1'"),
        (
            "[dicom]\nallowed_calling = 'WS1'",
            "dicom.allowed_calling: expected an array, got string 'WS1'",
        ),
        (
            "[dicom]\nallowed_calling = [1]",
            "dicom.allowed_calling[0]: expected a string, got integer 1",
        ),
        (
            "[dicom]\nallowed_calling = [[]]",
            "dicom.allowed_calling[0]: expected a string, got array",
        ),
    ],
)
def test_table_vs_scalar(tmp_path: Path, text: str, expected: str) -> None:
    assert errors_of(tmp_path, text) == [expected]


def test_missing_required_fields_all_reported(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "[[dicom.nodes]]\n") == [
        "dicom.nodes[0].ae_title: required",
        "dicom.nodes[0].host: required",
        "dicom.nodes[0].port: required",
    ]


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("port", "0", "must be 1-65535"),
        ("port", "65536", "must be 1-65535"),
        ("listen", "'localhost'", "must be an IPv4 or IPv6 address"),
        ("max_pdu", "4095", "must be 0 (unlimited) or 4096-4294967295"),
        ("max_pdu", str(2**32), "must be 0 (unlimited) or 4096-4294967295"),
        ("max_associations", "0", "must be > 0"),
        ("dimse_timeout_s", "0", "must be > 0"),
        ("network_timeout_s", "-1.5", "must be > 0"),
        ("shutdown_grace_s", "-0.1", "must be >= 0"),
        ("allowed_calling", "['OK', 'BAD\\\\AE']", AE_MSG),
    ],
)
def test_dicom_checks(tmp_path: Path, key: str, value: str, expected: str) -> None:
    errors = errors_of(tmp_path, f"[dicom]\n{key} = {value}\n")
    where = "allowed_calling[1]" if key == "allowed_calling" else key
    assert errors == [f"dicom.{where}: {expected}"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("port", 1), ("port", 65535), ("listen", "::"), ("listen", "10.0.0.1"),
     ("max_pdu", 0), ("max_pdu", 4096), ("max_pdu", 2**32 - 1), ("shutdown_grace_s", 0.0)],
)  # fmt: skip
def test_dicom_boundaries_accepted(tmp_path: Path, key: str, value: object) -> None:
    cfg = load_config(write(tmp_path, f"[dicom]\n{key} = {value!r}\n"))
    assert getattr(cfg.dicom, key) == value


def test_store_compression_literal(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "[store]\ncompression = 'zstd'")).store.compression == "zstd"
    assert errors_of(tmp_path, "[store]\ncompression = 'lz4'") == [
        "store.compression: expected one of 'off', 'zstd', got string 'lz4'"
    ]
    assert errors_of(tmp_path, "[store]\ncompression = 1") == [
        "store.compression: expected one of 'off', 'zstd', got integer 1"
    ]


# ---------------------------------------------------------------------------- ByteSize


@pytest.mark.parametrize(
    ("raw", "size"),
    [
        (0, 0),
        (1024, 1024),
        ("0", 0),
        ("1234", 1234),
        ("7 B", 7),
        ("10 kB", 10_000),
        ("10 KB", 10_000),
        ("2GB", 2_000_000_000),
        ("3 TB", 3 * 10**12),
        ("512 MiB", 512 * 2**20),
        ("512 mib", 512 * 2**20),
        ("4 KiB", 4096),
        ("1.5 GiB", 3 * 2**29),
        ("2 TiB", 2 * 2**40),
        ("0.5 kB", 500),
        ("  1 MB  ", 10**6),
    ],
)
def test_byte_size_good(raw: int | str, size: int) -> None:
    value = ByteSize(raw)
    assert value == size
    assert isinstance(value, int)


@pytest.mark.parametrize(
    "raw", ["", "lots", "MiB", "5 XB", "5 KiBB", "-5 MB", "1e6", "1,5 MB", "5 M", "1.5 B", -1]
)
def test_byte_size_bad(raw: int | str) -> None:
    with pytest.raises(ValueError):
        ByteSize(raw)


def test_byte_size_errors_in_config(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "[store]\nmax_bytes = -1\nmin_free_bytes = '1.5 B'\n")
    assert errors == [
        "store.max_bytes: must be >= 0",
        "store.min_free_bytes: invalid byte size '1.5 B': not a whole number of bytes",
    ]


def test_byte_size_from_string_in_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[store]\nmax_bytes = '2 GiB'\nmin_free_bytes = '1GB'\n"))
    assert (cfg.store.max_bytes, cfg.store.min_free_bytes) == (2 * 2**30, 10**9)


# ---------------------------------------------------------------------------- AE titles


@pytest.mark.parametrize(
    ("title", "ok"),
    [
        ("A" * 16, True),
        ("A" * 17, False),
        ("WS1", True),
        (" WS1 ", True),  # leading/trailing spaces are non-significant (PS3.5 6.2)
        ("WS 1", True),
        ("ws-1_~!", True),
        ("WS\\1", False),
        ("WS\x01", False),
        ("WS\t1", False),
        ("WS\x7f", False),
        ("PACS\u00c4", False),
        ("", False),
        ("   ", False),
        (" " * 17, False),
    ],
)
def test_ae_title_rules(title: str, ok: bool) -> None:
    assert schema.ae_title(title) == (None if ok else AE_MSG)


def test_ae_title_error_in_config(tmp_path: Path) -> None:
    assert errors_of(tmp_path, '[dicom]\nae_title = "ABCDEFGHIJKLMNOPQ"\n') == [
        f"dicom.ae_title: {AE_MSG}"
    ]


def test_ae_title_with_spaces_loads(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, '[dicom]\nae_title = " GW "\n')).dicom.ae_title == " GW "


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("fe80::1%eth0", True),
        ("pacs.example.org", True),
        ("pacs.example.org.", True),
        ("pacs-1", True),
        ("3com.net", True),
        ("256.1.1.1", False),
        ("10.0.0", False),
        ("-pacs", False),
        ("pacs-", False),
        ("a..b", False),
        ("under_score", False),
        ("host name", False),
        ("a" * 64, False),
        (".".join(["a" * 63] * 4), False),
        ("", False),
    ],
)
def test_hostname_or_ip(host: str, ok: bool) -> None:
    assert schema.hostname_or_ip(host) == (
        None if ok else "must be an IP address or a hostname (RFC 1123)"
    )


# ---------------------------------------------------------------------------- cross-field


def test_duplicate_node_ae_titles(tmp_path: Path) -> None:
    nodes = "".join(
        f'[[dicom.nodes]]\nae_title = "{t}"\nhost = "10.0.0.{i}"\nport = 104\n'
        for i, t in enumerate(["WS1", "WS2", " WS1", "DICOMESH"])
    )
    errors = errors_of(tmp_path, nodes + '[dicom]\nallowed_calling = ["A", "B", "A "]\n')
    assert errors == [
        "dicom.nodes[2].ae_title: duplicate AE title 'WS1'",
        "dicom.nodes[3].ae_title: AE title 'DICOMESH' is our own ae_title",
        "dicom.allowed_calling[2]: duplicate AE title 'A'",
    ]


def test_cross_field_rules_wait_for_clean_fields(tmp_path: Path) -> None:
    # A node that failed to load cannot be compared; only the field error is reported.
    text = (
        '[[dicom.nodes]]\nae_title = "WS1"\nhost = "h1"\nport = 0\n'
        '[[dicom.nodes]]\nae_title = "WS1"\nhost = "h2"\nport = 104\n'
    )
    assert errors_of(tmp_path, text) == ["dicom.nodes[0].port: must be 1-65535"]


# ---------------------------------------------------------------------------- file + overrides


def test_overrides_win_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, CONTRACT)
    overrides = {"dicom.port": 4242, "state_dir": str(tmp_path), "dicom.ae_title": "GW2"}
    cfg = load_config(path, overrides)
    assert cfg.dicom.port == 4242
    assert cfg.dicom.ae_title == "GW2"
    assert cfg.state_dir == tmp_path
    assert cfg.dicom.nodes[0].ae_title == "WS1"  # untouched keys keep the file's values


def test_overrides_without_file_and_nested_mapping() -> None:
    cfg = load_config(None, {"store": {"compression": "zstd"}, "log.level": "debug"})
    assert cfg.store.compression == "zstd"
    assert cfg.log.level == "debug"
    assert cfg.dicom == DicomConfig()


def test_overrides_are_validated(tmp_path: Path) -> None:
    path = write(tmp_path, CONTRACT)
    overrides = {"dicom.port": 0, "dicom.prot": 1, "store.max_bytes": "9 XB", "dicom.nodes": 3}
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, overrides)
    assert excinfo.value.errors == [
        "dicom.prot: unknown key (did you mean 'port'?)",
        "dicom.port: must be 1-65535",
        "dicom.nodes: expected an array, got integer 3",
        "store.max_bytes: invalid byte size '9 XB': expected a number with an optional unit "
        "B, kB, MB, GB, TB, KiB, MiB, GiB or TiB",
    ]


def test_overrides_do_not_mutate_callers_mapping() -> None:
    store = {"compression": "zstd"}
    load_config(None, {"store": store, "store.max_bytes": 1})
    assert store == {"compression": "zstd"}


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[dicom]\nport = = 3\n", name="broken.toml")
    errors = errors_of_path(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}: ")
    assert "line 2" in errors[0]


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert errors_of_path(missing) == [f"{missing}: No such file or directory"]
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"a = '\xff'\n")
    assert errors_of_path(binary)[0].startswith(f"{binary}: ")


# ---------------------------------------------------------------------------- render / dump


def test_render_toml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, CONTRACT),
        {
            "state_dir": str(tmp_path / "state"),
            "log.level": "warning",
            "dicom.allowed_calling": ["WS1", "MODALITY"],
            "dicom.nodes": [
                {"ae_title": "WS1", "host": "127.0.0.1", "port": 11113},
                {"ae_title": "PACS", "host": "pacs.example.org", "port": 104},
            ],
            "dicom.max_pdu": 65536,
            "store.max_bytes": "2 GiB",
            "store.compression": "zstd",
        },
    )
    text = render_toml(cfg)
    assert 'ae_title = "PACS"' in text
    assert "max_bytes = 2147483648" in text
    again = load_config(write(tmp_path, text, name="rendered.toml"))
    assert again == cfg
    assert render_toml(load_config()) != text  # the non-defaults really were written


def test_render_defaults_round_trip(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, render_toml(Config()))) == Config()


@dataclass(frozen=True)
class _Upstream:
    url: str = setting(doc="where to connect")
    password: Secret = setting(doc="shared secret")
    cert: Path | None = setting(None, doc="client certificate")
    mode: Literal["a", "b"] = setting("a", doc="mode")


@dataclass(frozen=True)
class _WithSecret:
    upstream: list[_Upstream] = setting(default_factory=list, doc="upstreams")


def test_secret_masked() -> None:
    cfg = schema.load(_WithSecret, {"upstream": [{"url": "u", "password": "hunter2"}]})
    up = cfg.upstream[0]
    assert up.password == "hunter2"
    assert isinstance(up.password, Secret)
    assert "hunter2" not in repr(cfg)
    assert schema.dump(cfg) == {"upstream": [{"url": "u", "password": "********", "mode": "a"}]}
    assert schema.dump(cfg, mask_secrets=False)["upstream"][0]["password"] == "hunter2"


def test_secret_value_not_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as excinfo:
        schema.load(_WithSecret, {"upstream": [{"url": "u", "password": 31337}]})
    assert excinfo.value.errors == ["upstream[0].password: expected a string, got integer"]


def test_optional_and_path() -> None:
    cfg = schema.load(
        _WithSecret, {"upstream": [{"url": "u", "password": "p", "cert": "/etc/c.pem"}]}
    )
    assert cfg.upstream[0].cert == Path("/etc/c.pem")
    assert schema.dump(cfg, mask_secrets=False)["upstream"][0]["cert"] == "/etc/c.pem"
    none = schema.load(_WithSecret, {"upstream": [{"url": "u", "password": "p", "cert": None}]})
    assert none.upstream[0].cert is None


def test_load_with_path_prefix_and_non_table_root() -> None:
    with pytest.raises(ConfigError) as excinfo:
        schema.load(DicomNode, {"ae_title": "A", "host": "h", "port": "x"}, "dicom.nodes[4]")
    assert excinfo.value.errors == ["dicom.nodes[4].port: expected an integer, got string 'x'"]
    with pytest.raises(ConfigError) as excinfo:
        schema.load(DicomNode, [], "relay")  # type: ignore[arg-type]
    assert excinfo.value.errors == ["relay: expected a table, got array"]


def test_unsupported_schema_type_is_a_programming_error() -> None:
    @dataclass(frozen=True)
    class Bad:
        x: complex = setting(1j)

    with pytest.raises(TypeError):
        schema.load(Bad, {"x": 1})


def test_generic_checks() -> None:
    assert schema.port_range(1) is None and schema.port_range(65536) == "must be 1-65535"
    assert schema.positive(0.001) is None and schema.positive(0) == "must be > 0"
    assert schema.non_negative(0) is None and schema.non_negative(-1) == "must be >= 0"
    assert schema.one_of("x", "y")("y") is None
    assert schema.one_of("x", "y")("z") == "must be one of 'x', 'y'"
    assert schema.in_range(2, 4)(5) == "must be 2-4"


def test_non_callable_check_fails_at_definition() -> None:
    with pytest.raises(TypeError, match="check must be callable"):
        setting(1, check="port_range")  # type: ignore[arg-type]


def test_board_defaults_lie_under_the_file_and_flags(tmp_path: Path) -> None:
    board = {
        "dicom": {"max_associations": 16, "ae_title": "BOARD"},
        "store": {"compression": "zstd"},
    }
    path = tmp_path / "c.toml"
    path.write_text('[dicom]\nae_title = "FILE"\n')
    cfg = load_config(path, {"dicom.port": 1234}, defaults=board)
    assert cfg.dicom.max_associations == 16  # from the board: the file is silent
    assert cfg.dicom.ae_title == "FILE"  # the file wins over the board
    assert cfg.dicom.port == 1234  # flags win over both
    assert cfg.store.compression == "zstd"
    assert board["dicom"]["ae_title"] == "BOARD"  # the profile is not edited
    with pytest.raises(ConfigError, match=r"dicom\.max_associations"):
        load_config(None, defaults={"dicom": {"max_associations": -1}})
