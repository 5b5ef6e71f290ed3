"""`qos report` and `qos compare` from hand-made results: the numbers, the differences and
the embedded plots are there; missing samples, flows and values are shown as missing."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.qos.report import render_html
from appliance.qos.report_table import ReportError, load_result, rows, text_table

PNG = b"\x89PNG\r\n\x1a\n"


def _flow(sent: int, received: int, kbps: float, delay: float, samples: bool) -> dict:
    out = {
        "sent": sent,
        "received": received,
        "dropped": sent - received,
        "loss_ratio": (sent - received) / sent,
        "throughput_kbps": kbps,
        "delay_ms": {"mean": delay, "p50": delay, "p95": delay * 1.5, "max": delay * 2},
        "jitter_ms": 1.25,
    }
    if samples:
        out["samples"] = [[i * 0.09, None if i % 8 == 3 else delay + i % 5] for i in range(sent)]
    return out


REAL = {
    "flows": {"ecg": _flow(400, 350, 77.78, 120.0, samples=True)},
    "links": {"wan": {"capacity_kbps": 128, "utilisation": 0.6077, "remaining_kbps": 50.22}},
    "meta": {"source": "measured", "peer": "10.0.0.2"},
}
SIM = {
    "flows": {
        "ecg": _flow(400, 360, 80.0, 110.0, samples=False),
        "video": _flow(100, 100, 40.0, 50.0, samples=False),
    },
    "links": {"wan": {"capacity_kbps": 128, "utilisation": 0.9375, "remaining_kbps": 8.0}},
}


def _write(tmp_path: Path, name: str, data: object) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_rows_pair_by_name_with_differences() -> None:
    by_key = {(r.name, r.metric): r for r in rows(REAL, SIM)}
    loss = by_key[("ecg", "loss_ratio")]
    assert (loss.left, loss.right) == (12.5, 10.0)  # percent
    assert loss.diff == pytest.approx(2.5)  # percentage points
    thr = by_key[("ecg", "throughput_kbps")]
    assert thr.relative == pytest.approx((77.78 - 80) / 80)
    video = by_key[("video", "sent")]
    assert (video.left, video.right, video.diff) == (None, 100, None)
    assert ("ecg", "rtt_ms.mean") not in by_key  # neither side has it: no row


def test_compare_prints_side_by_side_table(tmp_path: Path, capsys) -> None:
    real, sim = _write(tmp_path, "real.json", REAL), _write(tmp_path, "sim.json", SIM)
    assert main(["qos", "compare", str(real), str(sim)]) == 0
    out = capsys.readouterr().out
    assert out == text_table(REAL, SIM)
    lines = out.splitlines()
    assert lines[0].split() == ["metric", "real", "sim", "diff", "rel"]
    loss = next(line for line in lines if "loss %" in line)  # ecg's: flows keep their order
    assert "12.50" in loss and "10" in loss and "+2.50" in loss and "+25.0%" in loss
    video_sent = next(line for line in lines if line.startswith("flow video"))
    assert video_sent.split()[-4:] == ["-", "100", "-", "-"]
    assert any("utilisation %" in line and "60.77" in line for line in lines)


def test_report_html_has_numbers_and_plots(tmp_path: Path, capsys) -> None:
    real, sim = _write(tmp_path, "real.json", REAL), _write(tmp_path, "sim.json", SIM)
    out = tmp_path / "report.html"
    assert main(["qos", "report", str(real), str(sim), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    page = out.read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    alts = [alt for alt, _ in images]
    assert alts == ["Loss per flow", "Throughput per flow", "ecg: delay over time"]
    for _, data in images:
        assert base64.b64decode(data).startswith(PNG)
    for number in ("12.50", "77.78", "80", "-2.22", "+2.50", "60.77", "93.75"):
        assert f"<td>{number}</td>" in page, number
    # Missing samples are said, not faked; nothing is fetched from elsewhere.
    assert "No per-packet samples for: ecg (sim), video (real), video (sim)" in page
    assert "http://" not in page and "https://" not in page
    assert "10.0.0.2" in page  # the measured side's meta


def test_report_without_any_samples_or_links() -> None:
    bare = {"flows": {"f": {"sent": 10, "received": 10, "loss_ratio": 0.0}}}
    page = render_html(bare, bare)
    assert page.count("<img") == 2  # loss and throughput bars; no delay plot
    assert "No per-packet samples for: f (real), f (sim)" in page
    empty = render_html({"flows": {}}, {"flows": {}})
    assert "<img" not in empty


@pytest.mark.parametrize(
    "content, message",
    [("{", "not JSON"), ("[]", "no 'flows' table"), ('{"flows": {}, "links": 3}', "'links'")],
)
def test_bad_result_files(tmp_path: Path, content: str, message: str, capsys) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ReportError, match=message):
        load_result(path)
    good = _write(tmp_path, "good.json", SIM)
    assert main(["qos", "compare", str(good), str(path)]) == 2
    assert message in capsys.readouterr().err


def test_missing_file(tmp_path: Path, capsys) -> None:
    good = _write(tmp_path, "good.json", SIM)
    code = main(["qos", "report", str(tmp_path / "nope.json"), str(good), "-o", "x.html"])
    assert code == 2
    assert "nope.json" in capsys.readouterr().err
