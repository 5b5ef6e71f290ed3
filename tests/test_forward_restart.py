"""kill -9 of a gateway process mid-queue: after restart every job completes.

Delivery is at-least-once: a send interrupted after the destination stored an instance but
before our commit of its result is sent again, so duplicates are bounded by the number of
sends running at the kill (MAX_SENDING); nothing is lost."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from forward_kit import destination, kill9, received, wait_until
from procs import free_port
from test_forward_queue import FAST, dicom_cfg

from appliance.forward.config import ForwardConfig, ForwardRule
from appliance.forward.core import State
from appliance.forward.forwarder import MAX_SENDING, Forwarder
from appliance.forward.sender import dicom_destinations
from appliance.store import Store
from appliance.store.config import StoreConfig

N = 12
RULES = [ForwardRule("all", ["DEST"])]

# The gateway side in a child process: ingests N instances (jobs queued in each instance's
# commit), waits until their jobs are durable, writes the UIDs, then keeps forwarding until killed.
_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[4])
    from pathlib import Path
    from forward_kit import instance
    from test_forward_queue import FAST, dicom_cfg
    from appliance.forward.config import ForwardConfig, ForwardRule
    from appliance.forward.forwarder import Forwarder
    from appliance.forward.sender import dicom_destinations
    from appliance.store import Store
    from appliance.store.config import StoreConfig
    store_dir, port, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    store = Store(StoreConfig(min_free_bytes=0), store_dir)
    cfg = ForwardConfig(rules=[ForwardRule("all", ["DEST"])], **FAST)
    fw = Forwarder(store, cfg, dicom_destinations(dicom_cfg(port)))
    fw.attach()
    fw.start()
    uids = []
    for _ in range(n):
        _raw, inc = instance("1.2.826.0.9")
        store.put_instance(inc)
        uids.append(inc.manifest.sop_instance_uid)
    for _ in range(400):
        if len(fw.jobs()) == n:
            break
        time.sleep(0.05)
    (store_dir.parent / "uids").write_text("\\n".join(uids))
    time.sleep(600)
    """
)


def test_kill9_mid_queue_resumes(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "rx"
    store_dir = tmp_path / "store"
    tests_dir = str(Path(__file__).parent)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(store_dir), str(port), str(N),
                              tests_dir])  # fmt: skip
    try:
        with destination(port, out, delay=0.15):
            wait_until(lambda: (tmp_path / "uids").exists(), 30, "child queued its jobs")
            wait_until(lambda: len(received(out)) >= 3, 30, "some instances forwarded")
            kill9(child)
            before_kill = len(received(out))
        uids = (tmp_path / "uids").read_text().split()
        assert len(uids) == N and before_kill < N  # killed mid-queue

        store = Store(StoreConfig(min_free_bytes=0), store_dir)
        cfg = ForwardConfig(rules=RULES, **FAST)  # type: ignore[arg-type]
        fw = Forwarder(store, cfg, dicom_destinations(dicom_cfg(port)))
        try:
            assert len(fw.jobs()) == N  # every job survived the kill
            with destination(port, out):
                fw.start()
                wait_until(lambda: [j.state for j in fw.jobs()] == [State.DONE] * N, 30, "done")
        finally:
            fw.stop()
            store.close()
    finally:
        if child.poll() is None:
            kill9(child)
    got = received(out)
    assert set(got) == set(uids)  # none lost
    assert len(got) - N <= MAX_SENDING  # duplicates only from sends cut by the kill
