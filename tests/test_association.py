"""Association policy of a real gateway (`dicom.allowed_calling`, `dicom.strict_called_ae`),
checked with echoscu: accepted associations echo, rejected ones fail and are logged."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from dcmtk import echoscu
from gateway import Gateway
from nodekit import wait_until

pytestmark = pytest.mark.timeout(60)


def _rejections(gw: Gateway) -> list[str]:
    return [line for line in gw.log().splitlines() if "rejected" in line]


def test_only_allowed_calling_ae_titles_may_associate(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gw = gateway_factory(dicom={"allowed_calling": ["MODALITY1"]})

    ok = echoscu(gw.host, gw.port, gw.ae_title, calling_ae="MODALITY1")
    assert ok.returncode == 0, ok.stderr
    assert _rejections(gw) == []

    refused = echoscu(gw.host, gw.port, gw.ae_title, calling_ae="OTHER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr
    wait_until(lambda: len(_rejections(gw)) == 1, what="the rejection in the gateway log")
    assert "association from OTHER at 127.0.0.1" in _rejections(gw)[0]


def test_wrong_called_ae_title_is_rejected_by_default(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gw = gateway_factory()

    refused = echoscu(gw.host, gw.port, "NOTDICOMESH")
    assert refused.returncode != 0
    assert "Called AE Title Not Recognized" in refused.stderr
    wait_until(lambda: len(_rejections(gw)) == 1, what="the rejection in the gateway log")

    ok = echoscu(gw.host, gw.port, gw.ae_title)
    assert ok.returncode == 0, ok.stderr


def test_rejection_log_names_the_called_ae_title_that_was_asked_for(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """An operator reading the log must see which wrong title the modality is configured with."""
    gw = gateway_factory()
    assert echoscu(gw.host, gw.port, "NOTDICOMESH", calling_ae="CT_ROOM2").returncode != 0
    wait_until(lambda: len(_rejections(gw)) == 1, what="the rejection in the gateway log")
    assert (
        "association from CT_ROOM2 at 127.0.0.1 (called NOTDICOMESH) rejected"
        in (_rejections(gw)[0])
    )


def test_any_called_ae_title_is_accepted_when_not_strict(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gw = gateway_factory(dicom={"strict_called_ae": False})

    ok = echoscu(gw.host, gw.port, "NOTDICOMESH")
    assert ok.returncode == 0, ok.stderr
    assert _rejections(gw) == []
