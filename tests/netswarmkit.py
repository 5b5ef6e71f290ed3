"""A bonded clinic on the uplink lab (tests/netlab.py): real `dicomesh run` gateways, each in
its namespace, each bringing up its own wireguard-go tunnels, policy routing and uplink
health; for tests/test_net_swarm_lab.py and bench/bonding.py.

    clinic (3 uplinks, tunnels 10.90.1.1-3)  ==inet==  site j (1 line, tunnel 10.90.<j+1>.1)

Rates are ADSL x10 (LAB.md): each clinic line downloads at `down_bps` (tbf on the ISP side,
200 ms buffer); with `serve=True` its uploads are shaped too, by the gateway's own shaper
(`[net.uplinks.shape]`, 95 % of `up_kbps` = `down_bps`), as when the clinic serves a study to
a site. The sites' lines are not shaped, so the clinic's lines are the bottleneck.
Every site admits the clinic (its three tunnel keys, addresses and endpoints) and the clinic
admits every site, the way `dicomesh peer add` does it; keys are made before the start in
the state directories, where the gateways load them from.

Wire compression is off: chunks travel raw, so the bytes on the lines are the payload (plus
HTTP, TCP, IP and WireGuard headers) and line-rate yardsticks are exact.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcmtk import findscu, getscu, storescu
from dicomfiles import dataset_bytes, sop_instance_uid
from gateway import DICOMESH, REPO, Gateway
from lab import when_grown
from netlab import UplinkLab

from appliance.mesh.peers import PEERS_FILE, Peer, add_peer
from appliance.net import keys

MESH_PORT = 7480
WG_PORT = 51820
LINE_BPS = 8_000_000  # ADSL 800 kbit/s x10 (LAB.md), each clinic line's download
WG_GOODPUT = 0.917  # LAB.md: TCP payload through WireGuard over a tbf link of rate R
START_TIMEOUT = 90.0  # four gateways and their tunnel daemons start at once on 2 cores
STOP_TIMEOUT = 15.0
PROBE = str(Path(__file__).resolve().parent / "swarmkit.py")
# Uplink health: a cut line is down after 3 x 0.5 s (+ the probe in flight).
HEALTH = {"interval_s": 0.5, "timeout_s": 0.4, "down_after": 3, "up_after": 3}


def clinic_overlay(i: int) -> str:
    """The clinic's tunnel address on uplink i (1-based): one /24 per site (README)."""
    return f"10.90.1.{i}"


def site_overlay(j: int) -> str:
    return f"10.90.{j + 1}.1"


@dataclass(frozen=True)
class FetchRun:
    """One `dicomesh fetch`, timed from its start to its exit, and what each clinic line
    received meanwhile (bytes at the interface: payload plus all headers)."""

    seconds: float
    returncode: int
    output: str
    rx: list[int]  # per clinic uplink, config order
    tx: list[int]  # sent per clinic uplink meanwhile

    @property
    def rx_total(self) -> int:
        return sum(self.rx)


class BondedClinic:
    """A clinic gateway with `uplinks` lines and `sites` peer gateways, over tunnels. A context
    manager: every gateway is stopped and the lab torn down on exit, even on failure."""

    def __init__(
        self,
        workdir: Path,
        *,
        uplinks: int = 3,
        sites: int = 3,
        down_bps: int = LINE_BPS,
        mesh: dict[str, Any] | None = None,
        serve: bool = False,
    ) -> None:
        self.workdir = workdir
        self.lab = UplinkLab(uplinks=uplinks, sites=sites, down_bps=down_bps, latency_ms=200)
        self.down_bps = down_bps
        self.serve = serve
        self._mesh = {"sync_interval_s": 0.5, "wire_compression": False, **(mesh or {})}
        self.clinic: Gateway | None = None
        self.sites: list[Gateway] = []

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> BondedClinic:
        self.lab.__enter__()
        try:
            self._configure()
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the gateways (SIGTERM, then SIGKILL), then tear the lab down; the lab goes
        even when a gateway does not stop."""
        errors = []
        for gw in [*self.sites, *([self.clinic] if self.clinic else [])]:
            try:
                gw.stop(timeout=STOP_TIMEOUT)
            except Exception as exc:  # the others and the lab must go too
                errors.append(repr(exc))
        self.lab.close()
        if errors:
            raise RuntimeError("stopping gateways: " + "; ".join(errors))

    def _gateway(self, label: str, mesh: dict[str, Any], net: dict[str, Any]) -> Gateway:
        return Gateway(
            self.workdir / label,
            ae_title=f"DM-{label.upper()}",
            mesh={"port": MESH_PORT, "name": label, **self._mesh, **mesh},
            net=net,
            qos={"enabled": False},
            web={"enabled": False},
        )

    def _configure(self) -> None:
        lab = self.lab
        clinic_uplinks = [
            {
                "name": f"adsl{i}",
                "interface": line.iface,
                "gateway": line.gateway,
                "up_kbps": self.down_bps // 1000,
                "down_kbps": self.down_bps // 1000,
                "overlay_address": clinic_overlay(i),
                "shape": {"enabled": self.serve},
            }
            for i, line in enumerate(lab.lines, start=1)
        ]
        self.clinic = self._gateway(
            "clinic",
            {"address": clinic_overlay(1)},
            {
                "uplinks": clinic_uplinks,
                "health": HEALTH,
                "wireguard": {"enabled": True, "interface_prefix": lab.wg_prefix + "c",
                              "listen_port": WG_PORT},
            },
        )  # fmt: skip
        for j, line in enumerate(lab.site_lines, start=1):
            uplink = {
                "name": "dsl",
                "interface": line.iface,
                "gateway": line.gateway,
                "up_kbps": 30_000,
                "down_kbps": 30_000,
                "overlay_address": site_overlay(j),
            }
            self.sites.append(
                self._gateway(
                    f"site{j}",
                    {"address": site_overlay(j)},
                    {
                        "uplinks": [uplink],
                        "health": HEALTH,
                        "wireguard": {"enabled": True, "interface_prefix": lab.wg_prefix + f"s{j}",
                                      "listen_port": WG_PORT},
                    },
                )
            )  # fmt: skip
        # Keys where the gateways keep them; admissions as `dicomesh peer add` writes them.
        clinic_keys = [
            keys.load_or_create(self.clinic.state_dir, u["name"]).public_b64 for u in clinic_uplinks
        ]
        clinic_peer = Peer(
            "clinic",
            clinic_keys[0],
            [clinic_overlay(i) for i in range(1, len(lab.lines) + 1)],
            port=MESH_PORT,
            tunnel_keys=clinic_keys[1:],
            endpoints=[f"{line.addr}:{WG_PORT + i}" for i, line in enumerate(lab.lines)],
        )
        for j, (site, line) in enumerate(zip(self.sites, lab.site_lines, strict=True), start=1):
            key = keys.load_or_create(site.state_dir, "dsl").public_b64
            add_peer(
                self.clinic.state_dir / PEERS_FILE,
                Peer(site.mesh_name, key, [site_overlay(j)], port=MESH_PORT,
                     endpoints=[f"{line.addr}:{WG_PORT}"]),
            )  # fmt: skip
            add_peer(site.state_dir / PEERS_FILE, clinic_peer)

    def _start(self) -> None:
        assert self.clinic is not None
        pairs = [(self.clinic, self.lab.clinic)]
        pairs += [(s, line.ns) for s, line in zip(self.sites, self.lab.site_lines, strict=True)]
        with ThreadPoolExecutor(len(pairs)) as pool:
            futures = [pool.submit(gw.start, START_TIMEOUT, netns=ns) for gw, ns in pairs]
        for f in futures:
            f.result()

    # -- data -------------------------------------------------------------------------------

    def store(
        self, study_dir: Path, sites: list[int] | None = None, *, clinic: bool = False
    ) -> None:
        """C-STORE the study at the given sites' gateways (1-based; default all), at once;
        with `clinic`, at the clinic only."""
        chosen = [self.sites[j - 1] for j in (sites or range(1, len(self.sites) + 1))]
        if clinic:
            assert self.clinic is not None
            chosen = [self.clinic]

        def one(gw: Gateway) -> None:
            run = storescu(gw.host, gw.port, gw.ae_title, study_dir, wrapper=gw.tool_prefix)
            if not run.ok:
                raise RuntimeError(f"storescu to {gw.mesh_name}: {run.stderr[-1000:]}")

        with ThreadPoolExecutor(len(chosen)) as pool:
            for f in [pool.submit(one, gw) for gw in chosen]:
                f.result()

    def holdings(self, study_uid: str, via: int = 1) -> dict[str, dict]:
        """The clinic's catalog entries for the study, pulled from inside site `via` (its
        admitted overlay address, through its tunnel), as swarmkit.py's probe does."""
        ns = self.lab.site_lines[via - 1].ns
        done = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, PROBE,
             "holdings", clinic_overlay(1), str(MESH_PORT), study_uid],
            capture_output=True, text=True, timeout=15,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"holdings probe: {done.stderr.strip()[-500:]}")
        return json.loads(done.stdout)

    def wait_held(self, study_uid: str, instances: int, timeout: float = 60.0) -> None:
        """Until the clinic's catalog lists every site as a complete holder."""
        names = {s.mesh_name for s in self.sites}
        deadline = time.monotonic() + timeout
        seen: dict[str, dict] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                seen = self.holdings(study_uid)
            if all(
                seen.get(n, {}).get("state") == "complete"
                and seen.get(n, {}).get("instances") == instances
                for n in names
            ):
                return
            time.sleep(0.3)
        raise TimeoutError(f"clinic's catalog has {seen} for {study_uid} after {timeout} s")

    # -- observation ------------------------------------------------------------------------

    def rx_bytes(self) -> list[int]:
        """Bytes received so far on each clinic uplink (`ip -json -s link`, from outside)."""
        links = {
            link["ifname"]: link["stats64"]["rx"]["bytes"]
            for link in self.lab.ip_json(self.lab.clinic, "-s", "link", "show")
        }  # one `ip` run for all lines: it is polled while transfers are timed
        return [links[line.iface] for line in self.lab.lines]

    def tx_bytes(self) -> list[int]:
        """Bytes sent so far on each clinic uplink (`ip -json -s link`, from outside)."""
        links = {
            link["ifname"]: link["stats64"]["tx"]["bytes"]
            for link in self.lab.ip_json(self.lab.clinic, "-s", "link", "show")
        }
        return [links[line.iface] for line in self.lab.lines]

    def site_sees(self, study_uid: str, site: int, timeout: float = 30.0) -> None:
        """Until site `site`'s C-FIND lists the study (its catalog has the clinic's entry)."""
        gw = self.sites[site - 1]
        deadline = time.monotonic() + timeout
        while not any(
            str(ds.get("StudyInstanceUID", "")) == study_uid
            for ds in findscu(gw.host, gw.port, gw.ae_title, [
                "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"],
                timeout=30, wrapper=gw.tool_prefix)
        ):  # fmt: skip
            if time.monotonic() > deadline:
                raise TimeoutError(f"site{site} does not list {study_uid} after {timeout} s")
            time.sleep(0.3)

    def fetch(self, study_uid: str, timeout: float, *, site: int | None = None) -> FetchRun:
        """`dicomesh fetch` at the clinic, or at site `site` (on the host, over the gateway's
        control socket), timed; with what each clinic line received and sent meanwhile."""
        gw = self.clinic if site is None else self.sites[site - 1]
        assert gw is not None
        cmd = [*DICOMESH, "fetch", "--config", str(gw.config_path), study_uid]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        rx0, tx0 = self.rx_bytes(), self.tx_bytes()
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
        rx = [b - a for a, b in zip(rx0, self.rx_bytes(), strict=True)]
        tx = [b - a for a, b in zip(tx0, self.tx_bytes(), strict=True)]
        return FetchRun(seconds, proc.returncode, output, rx, tx)

    def mismatches(
        self, originals: list[Path], outdir: Path, *, site: int | None = None
    ) -> list[str]:
        """C-GET the study from the clinic, or from site `site` (getscu in its namespace),
        and compare every instance's data set with the originals; the differences found."""
        import pydicom

        gw = self.clinic if site is None else self.sites[site - 1]
        assert gw is not None
        study_uid = str(pydicom.dcmread(originals[0], stop_before_pixels=True).StudyInstanceUID)
        keys_ = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"]
        got = getscu(gw.host, gw.port, gw.ae_title, keys_, outdir, timeout=120,
                     wrapper=gw.tool_prefix)  # fmt: skip
        if got.returncode != 0:
            return [f"getscu exit {got.returncode}: {got.stderr[-500:]}"]
        received = {sop_instance_uid(p): p for p in outdir.iterdir() if p.is_file()}
        problems = []
        for path in originals:
            uid = sop_instance_uid(path)
            if uid not in received:
                problems.append(f"{uid}: missing")
            elif dataset_bytes(received[uid]) != dataset_bytes(path):
                problems.append(f"{uid}: content differs")
        return problems

    def uplink_state(self, uplink: str) -> str:
        """The clinic's last logged health of `uplink` ("unknown" before any change)."""
        assert self.clinic is not None
        marker = f"uplink {uplink}: "
        state = "unknown"
        for line in self.clinic.log().splitlines():
            _, found, rest = line.partition(marker)
            if found and " -> " in rest:
                state = rest.split(" -> ", 1)[1].split()[0]
        return state

    def wait_usable(self, uplink: str, timeout: float) -> bool:
        """Until the clinic's health of `uplink` is usable (not down)."""
        deadline = time.monotonic() + timeout
        while self.uplink_state(uplink) == "down":
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True


@contextlib.contextmanager
def rx_timeline(bonded: BondedClinic, every_s: float = 0.5) -> Iterator[list[float]]:
    """Mbit/s the clinic's lines received together in each `every_s` while the body runs
    (a failed rate check then shows a pause apart from a uniformly slow transfer)."""
    rates: list[float] = []
    done = threading.Event()

    def sample() -> None:
        last = (time.monotonic(), sum(bonded.rx_bytes()))
        while not done.wait(every_s):  # bounded by the body: `done` is set when it ends
            now = (time.monotonic(), sum(bonded.rx_bytes()))
            rates.append((now[1] - last[1]) * 8 / max(now[0] - last[0], 1e-3) / 1e6)
            last = now

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        yield rates
    finally:
        done.set()
        watcher.join(timeout=10)


def when_received(
    bonded: BondedClinic, nbytes: int, action: Callable[[], None]
) -> contextlib.AbstractContextManager[list[float]]:
    """Run `action` once the clinic's lines together received `nbytes` more than on entry;
    yields a list that then holds the seconds after entry at which it ran."""
    return when_grown(lambda: sum(bonded.rx_bytes()), nbytes, action, 0.1)
