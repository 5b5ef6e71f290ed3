"""The gateway starts, answers C-ECHO, stores a series and stops cleanly."""

from dcmtk import echoscu, storescu


def test_echo_store_and_clean_stop(gateway, small_series):
    assert echoscu(gateway.host, gateway.port, gateway.ae_title).returncode == 0
    run = storescu(gateway.host, gateway.port, gateway.ae_title, small_series.paths)
    assert run.ok, run.stderr
    assert [status for _, status in run.results] == [0] * len(small_series.paths)
    assert gateway.stop() == 0
    assert "stopped" in gateway.log()
