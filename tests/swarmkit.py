"""dicomesh gateways on the network lab (tests/lab.py), for the swarm tests and bench/swarm.py.

One real `dicomesh run` per lab node, started inside the node's namespace (``ip netns exec``):

- ``mesh.address`` is the node's lab address, so the mesh listens there and its connections
  originate from it (peers are identified by source address); every gateway uses mesh port
  ``MESH_PORT`` (each namespace has its own ports);
- DICOM listens on 127.0.0.1 *inside* the namespace: storescu/findscu/getscu run there too
  (``Gateway.tool_prefix``), so DICOM traffic never crosses the shaped lines;
- every gateway admits every other one (downloader <-> sources, sources <-> sources), the way
  ``dicomesh peer add`` does it (peers.toml, written before the start);
- ``dicomesh fetch`` runs on the host: it reaches the downloader over its control socket, a
  file in the downloader's state directory.

When a study is "known" to the downloader. The swarm downloader takes its holders from the
catalog when a fetch starts, so a fetch timed too early would measure fewer sources than
intended. The only exact observable is the downloader's own catalog, and its one reader is
the mesh's catalog pull (/mesh/v1/catalog/pull), which the downloader answers to admitted
peers: ``holdings()`` asks it from inside a source's namespace (so the request comes from that
source's admitted address), exactly as that source's gateway does every sync interval, and
reads the "hold" entries of the study. It is read-only on the downloader's side.

Run as a script, this file is that probe (``holdings ADDR PORT STUDY``), started inside a
namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcmtk import getscu, storescu
from dicomfiles import dataset_bytes, sop_instance_uid
from gateway import DICOMESH, REPO, Gateway
from lab import Lab, LabError, Node, when_grown

MESH_PORT = 7480
SYNC_INTERVAL_S = 0.5  # catalog pulls: the study is known a moment after it is stored
START_TIMEOUT = 60.0  # k+1 gateways start at once on a 2-core machine
STOP_TIMEOUT = 10.0
PROBE_TIMEOUT = 10.0
PROBE = str(Path(__file__).resolve())
# The swarm's chunk frames (appliance/mesh/protocol.py FRAME): status, codec, raw size, length.
FRAME_HEADER = 10


@dataclass(frozen=True)
class Fetch:
    """One `dicomesh fetch` run, timed from its start to its exit."""

    seconds: float
    returncode: int
    output: str  # its progress bar and errors (the bar redraws with \r)
    rx_frame_bytes: int  # the downloader's link received this much meanwhile (frames)


def wire_payload(paths: Iterable[Path]) -> int:
    """Bytes the swarm moves for these files: each instance's chunks as the mesh server sends
    them (zstd level 1 when that saves >= 10 %, else raw, appliance/store/chunking.py), plus
    the frame headers. HTTP and TCP/IP overhead not included."""
    from appliance.store.chunking import split_and_hash

    total = 0
    for path in paths:
        chunks, _ = split_and_hash(dataset_bytes(path), compress=True)
        total += sum(len(c.stored) + FRAME_HEADER for c in chunks if c.stored is not None)
    return total


def at_received(
    lab: Lab, frame_bytes: int, action: Callable[[], None]
) -> contextlib.AbstractContextManager[list[float]]:
    """Run ``action`` once the downloader's link has received ``frame_bytes`` more than on
    entry; yields a list that then holds the seconds after entry at which it ran."""
    return when_grown(lambda: lab.link_bytes(lab.downloader)[0], frame_bytes, action, 0.02)


class Swarm:
    """One dicomesh gateway per lab node, all admitting each other. A context manager:
    everything it started is stopped on exit (the lab's teardown kills leftovers too)."""

    def __init__(self, lab: Lab, workdir: Path, **mesh: Any) -> None:
        self.lab = lab
        self.gateways: dict[str, Gateway] = {}
        for node in lab.nodes:
            self.gateways[node.label] = Gateway(
                workdir / node.label,
                ae_title=f"DM-{node.label.upper()}",
                mesh={
                    "address": node.addr,
                    "port": MESH_PORT,
                    "name": f"gw-{node.label}",
                    "sync_interval_s": SYNC_INTERVAL_S,
                    **mesh,
                },
            )
        for gw in self.gateways.values():
            for other in self.gateways.values():
                if other is not gw:
                    gw.admit(other)

    @property
    def downloader(self) -> Gateway:
        return self.gateways[self.lab.downloader.label]

    def gateway(self, node: Node | str) -> Gateway:
        return self.gateways[self.lab.node(node).label]

    def name(self, node: Node | str) -> str:
        """The mesh name of ``node``'s gateway (as catalogs and progress lines show it)."""
        return self.gateway(node).mesh_name

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Swarm:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start every gateway in its namespace at once; wait until all are READY."""
        with ThreadPoolExecutor(len(self.gateways)) as pool:
            futures = [
                pool.submit(self.gateways[n.label].start, START_TIMEOUT, netns=n.ns)
                for n in self.lab.nodes
            ]
        for f in futures:
            f.result()

    def close(self) -> None:
        """Stop every gateway (SIGTERM, then SIGKILL); never raises before all are stopped."""
        errors = []
        for label, gw in self.gateways.items():
            try:
                gw.stop(timeout=STOP_TIMEOUT)
            except Exception as exc:  # go on: the others must stop too
                errors.append(f"{label}: {exc!r}")
        if errors:
            raise RuntimeError("stopping gateways: " + "; ".join(errors))

    def kill(self, node: Node | str) -> None:
        """SIGKILL ``node``'s gateway (its kernel then closes its connections)."""
        self.gateway(node).kill9()

    # -- data -------------------------------------------------------------------------------

    def store(self, study_dir: Path, nodes: Iterable[Node | str]) -> None:
        """C-STORE every file of ``study_dir`` at each node's gateway (storescu inside the
        node's namespace, all nodes at once)."""

        def one(gw: Gateway) -> None:
            run = storescu(gw.host, gw.port, gw.ae_title, study_dir, wrapper=gw.tool_prefix)
            if not run.ok:
                raise RuntimeError(f"storescu to {gw.mesh_name}: {run.stderr[-1000:]}")

        gws = [self.gateway(n) for n in nodes]
        with ThreadPoolExecutor(len(gws)) as pool:
            for f in [pool.submit(one, gw) for gw in gws]:
                f.result()

    def holdings(self, study_uid: str, via: Node | str | None = None) -> dict[str, dict]:
        """The downloader's catalog: gateway name -> its "hold" of the study, asked from
        inside ``via`` (default: the first source that is not cut)."""
        node = self.lab.node(via) if via else next(
            s for s in self.lab.sources if not self.lab.is_cut(s)
        )  # fmt: skip
        d = self.lab.downloader
        done = subprocess.run(
            ["ip", "netns", "exec", node.ns, sys.executable, PROBE,
             "holdings", d.addr, str(MESH_PORT), study_uid],
            capture_output=True, text=True, timeout=PROBE_TIMEOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        if done.returncode != 0:
            raise LabError(f"holdings probe in {node.label}: {done.stderr.strip()[-500:]}")
        return json.loads(done.stdout)

    def wait_held(
        self, study_uid: str, nodes: Iterable[Node | str], instances: int, timeout: float = 30.0
    ) -> None:
        """Block until the downloader's catalog says each node's gateway holds the complete
        study (all ``instances``); TimeoutError naming what it saw otherwise."""
        names = {self.name(n) for n in nodes}
        deadline = time.monotonic() + timeout
        seen: dict[str, dict] = {}
        while time.monotonic() < deadline:
            seen = self.holdings(study_uid)
            if all(
                seen.get(n, {}).get("state") == "complete"
                and seen.get(n, {}).get("instances") == instances
                for n in names
            ):
                return
            time.sleep(0.2)
        raise TimeoutError(
            f"after {timeout} s the downloader's catalog has {seen} for {study_uid}, "
            f"wanted {sorted(names)} complete with {instances} instances"
        )

    # -- the download -----------------------------------------------------------------------

    def fetch(self, study_uid: str, timeout: float) -> Fetch:
        """Run `dicomesh fetch` for the downloader (on the host) and time it to its exit."""
        cmd = [*DICOMESH, "fetch", "--config", str(self.downloader.config_path), study_uid]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        rx0 = self.lab.link_bytes(self.lab.downloader)[0]
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            raise TimeoutError(f"dicomesh fetch still running after {timeout} s: "
                               f"{output[-300:]!r}") from None  # fmt: skip
        seconds = time.monotonic() - start
        rx = self.lab.link_bytes(self.lab.downloader)[0] - rx0
        return Fetch(seconds, proc.returncode, output, rx)

    def gateway_seconds(self, study_uid: str) -> float | None:
        """The downloader's own "fetch <uid> done: ... in T s" time, if it logged one."""
        marker = f"fetch {study_uid} done:"
        for line in self.downloader.log().splitlines():
            if marker in line:
                return float(line.rsplit(" in ", 1)[1].split()[0])
        return None

    def mismatches(self, originals: Iterable[Path], outdir: Path) -> list[str]:
        """C-GET the study from the downloader (getscu in its namespace) into ``outdir`` and
        compare each instance's data set bytes with ``originals``; the differences found."""
        paths = list(originals)
        if not paths:
            return ["no originals"]
        study_uid = _study_uid(paths[0])
        gw = self.downloader
        keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"]
        got = getscu(gw.host, gw.port, gw.ae_title, keys, outdir, timeout=120,
                     wrapper=gw.tool_prefix)  # fmt: skip
        if got.returncode != 0:
            return [f"getscu exit {got.returncode}: {got.stderr[-500:]}"]
        received = {sop_instance_uid(p): p for p in outdir.iterdir() if p.is_file()}
        problems = []
        for path in paths:
            uid = sop_instance_uid(path)
            if uid not in received:
                problems.append(f"{uid}: missing")
            elif dataset_bytes(received[uid]) != dataset_bytes(path):
                problems.append(f"{uid}: content differs")
        extra = set(received) - {sop_instance_uid(p) for p in paths}
        problems += [f"{uid}: not in the study" for uid in sorted(extra)]
        return problems


def _study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


# -- probe (runs inside a source's namespace) -------------------------------------------------


def _holdings(addr: str, port: int, study_uid: str) -> int:
    """Print {origin: hold payload} of ``study_uid`` from the catalog of the gateway at
    addr:port (a catalog pull from this namespace's admitted address)."""
    import http.client

    from appliance.mesh import protocol

    vv: dict[str, int] = {}
    holds: dict[str, Any] = {}
    for _ in range(100):  # bounded: each page advances the version vector
        conn = http.client.HTTPConnection(addr, port, timeout=5)
        body = protocol.encode_json({"vv": vv, "limit": 1000})
        conn.request("POST", "/mesh/v1/catalog/pull", body, {"Content-Type": protocol.JSON_TYPE})
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        if resp.status != 200:
            print(f"catalog pull: HTTP {resp.status} {raw[:200]!r}", file=sys.stderr)
            return 1
        delta = protocol.decode_json(raw)
        for e in delta["entries"]:
            vv[e["origin"]] = max(vv.get(e["origin"], 0), e["seq"])
            if e["kind"] == "hold" and e["study"] == study_uid:
                holds[e["origin"]] = e["payload"]
        if not delta["more"]:
            break
    print(json.dumps({k: v for k, v in holds.items() if v is not None}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "holdings":
        sys.exit("usage: swarmkit.py holdings ADDR PORT STUDY_UID")
    sys.exit(_holdings(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
