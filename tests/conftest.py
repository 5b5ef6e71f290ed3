"""Shared fixtures: real gateway processes and generated studies."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gateway import Gateway
from studygen import SeriesInfo, generate_ct_series


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Make started gateways (`factory(**config_sections)`); all are stopped at teardown."""
    made: list[Gateway] = []

    def factory(*, start: bool = True, **sections) -> Gateway:
        workdir = tmp_path / f"gw{len(made)}"
        workdir.mkdir()
        gw = Gateway(workdir, **sections)
        made.append(gw)
        return gw.start() if start else gw

    yield factory
    for gw in made:
        gw.stop()


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway]) -> Gateway:
    """One running gateway with default settings."""
    return gateway_factory()


@pytest.fixture(scope="session")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> SeriesInfo:
    """24 CT slices of 512x512 (~12.6 MB), generated once per session."""
    return generate_ct_series(tmp_path_factory.mktemp("ct24"), 24, seed=11)


@pytest.fixture(scope="session")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> SeriesInfo:
    """6 small CT slices (64x64) for quick protocol tests."""
    return generate_ct_series(tmp_path_factory.mktemp("ct6"), 6, rows=64, cols=64, seed=12)
