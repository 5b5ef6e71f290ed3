"""WireGuard in userspace: one `wireguard-go` process per device, configured over the
cross-platform UAPI (https://www.wireguard.com/xplatform/): text lines on the unix socket
`/var/run/wireguard/<ifname>.sock`, keys in hex, every reply ending in `errno=N` and a
blank line. The socket directory is global, so device names must be unique per machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

from appliance.net.errors import NetError
from appliance.net.netns import child_setup
from appliance.net.wireguard import WgDevice, WgPeer, WgUpdate

log = logging.getLogger(__name__)

UAPI_DIR = Path("/var/run/wireguard")
START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 3.0
UAPI_TIMEOUT_S = 5.0
_PEER_COUNTERS = (
    "persistent_keepalive_interval",
    "last_handshake_time_sec",
    "rx_bytes",
    "tx_bytes",
)


def uapi_path(ifname: str) -> Path:
    return UAPI_DIR / f"{ifname}.sock"


def set_request(update: WgUpdate) -> str:
    """The UAPI `set=1` request for `update`."""
    lines = ["set=1"]
    if update.private_key is not None:
        lines.append(f"private_key={update.private_key.hex()}")
    if update.listen_port is not None:
        lines.append(f"listen_port={update.listen_port}")
    if update.fwmark is not None:
        lines.append(f"fwmark={update.fwmark}")
    for key in update.remove:
        lines += [f"public_key={key.hex()}", "remove=true"]
    for peer in update.upsert:
        lines.append(f"public_key={peer.public_key.hex()}")
        if peer.endpoint is not None:
            lines.append(f"endpoint={peer.endpoint}")
        lines.append(f"persistent_keepalive_interval={peer.keepalive_s}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={ip}" for ip in peer.allowed_ips]
    return "\n".join(lines) + "\n\n"


def parse_get(ifname: str, reply: str) -> tuple[WgDevice, list[dict[str, object]]]:
    """A `get=1` reply as (device, per-peer stats)."""
    private, port, mark = b"", 0, 0
    peers: list[dict[str, object]] = []
    for line in reply.splitlines():
        key, _, value = line.partition("=")
        if key == "private_key":
            private = bytes.fromhex(value)
        elif key == "listen_port":
            port = int(value)
        elif key == "fwmark":
            mark = int(value)
        elif key == "public_key":
            peers.append({"public_key": bytes.fromhex(value), "allowed_ips": []})
        elif peers and key == "endpoint":
            peers[-1]["endpoint"] = value
        elif peers and key == "allowed_ip":
            peers[-1]["allowed_ips"].append(value)  # type: ignore[union-attr]
        elif peers and key in _PEER_COUNTERS:
            peers[-1][key] = int(value)
    device = WgDevice(
        ifname,
        private,
        port,
        mark,
        tuple(
            sorted(
                (
                    WgPeer(
                        p["public_key"],  # type: ignore[arg-type]
                        tuple(sorted(p["allowed_ips"])),  # type: ignore[arg-type]
                        p.get("endpoint"),  # type: ignore[arg-type]
                        int(p.get("persistent_keepalive_interval", 0)),  # type: ignore[arg-type]
                    )
                    for p in peers
                ),
                key=lambda p: p.public_key,
            )
        ),
    )
    return device, peers


class UserspaceBackend:
    """wireguard-go processes started (and stopped) by this gateway."""

    name = "userspace"

    def __init__(self, netns: str | None = None, binary: str = "wireguard-go") -> None:
        self.netns = netns
        self.binary = binary
        self._procs: dict[str, asyncio.subprocess.Process] = {}

    @staticmethod
    def available(binary: str = "wireguard-go") -> bool:
        return shutil.which(binary) is not None

    async def ensure_device(self, ifname: str) -> None:
        proc = self._procs.get(ifname)
        if proc is not None and proc.returncode is None and await self._answers(ifname):
            return
        if proc is None and await self._answers(ifname):
            # Not ours (another gateway, or a leftover we cannot account for): refuse rather
            # than configure someone else's tunnel.
            raise NetError(f"WireGuard device {ifname} is already run by another process")
        if proc is not None:
            log.warning("wireguard-go for %s exited (%s); restarting it", ifname, proc.returncode)
            self._procs.pop(ifname, None)
        uapi_path(ifname).unlink(missing_ok=True)  # stale: nobody answers on it
        binary = shutil.which(self.binary)
        if binary is None:
            raise NetError(f"{self.binary} not found (Debian: wireguard-go)")
        # FOREGROUND=1 also silences its "use the kernel module" banner on every start.
        env = {**os.environ, "LOG_LEVEL": "error", "WG_PROCESS_FOREGROUND": "1"}
        proc = await asyncio.create_subprocess_exec(
            binary,
            "-f",
            ifname,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=env,
            preexec_fn=child_setup(self.netns),
        )
        self._procs[ifname] = proc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not await self._answers(ifname):
            if proc.returncode is not None or loop.time() > deadline:
                await self.remove_device(ifname)
                raise NetError(f"wireguard-go did not bring up {ifname}")
            await asyncio.sleep(0.05)
        log.info("wireguard-go %s started (pid %d)", ifname, proc.pid)

    async def _answers(self, ifname: str) -> bool:
        try:
            await self._uapi(ifname, "get=1\n\n")
        except (OSError, NetError, TimeoutError):
            return False
        return True

    async def _uapi(self, ifname: str, request: str) -> str:
        async def exchange() -> str:
            reader, writer = await asyncio.open_unix_connection(str(uapi_path(ifname)))
            try:
                writer.write(request.encode())
                await writer.drain()
                reply = []
                while True:
                    line = (await reader.readline()).decode()
                    if not line or line == "\n":
                        break
                    reply.append(line)
                    if line.startswith("errno="):
                        break
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            text = "".join(reply)
            if not text.rstrip().endswith("errno=0"):
                raise NetError(f"{ifname}: UAPI error: {text.strip().splitlines()[-1:]}")
            return text

        return await asyncio.wait_for(exchange(), UAPI_TIMEOUT_S)

    async def read(self, ifname: str) -> WgDevice:
        return parse_get(ifname, await self._uapi(ifname, "get=1\n\n"))[0]

    async def apply(self, update: WgUpdate) -> None:
        if not update.empty:
            await self._uapi(update.ifname, set_request(update))

    async def stats(self, ifname: str) -> list[dict[str, object]]:
        import base64

        peers = parse_get(ifname, await self._uapi(ifname, "get=1\n\n"))[1]
        return [
            {
                "public_key": base64.b64encode(p["public_key"]).decode(),  # type: ignore[arg-type]
                "endpoint": p.get("endpoint"),
                "last_handshake": p.get("last_handshake_time_sec", 0),
                "rx_bytes": p.get("rx_bytes", 0),
                "tx_bytes": p.get("tx_bytes", 0),
            }
            for p in peers
        ]

    async def remove_device(self, ifname: str) -> None:
        proc = self._procs.pop(ifname, None)
        if proc is None:
            return
        if proc.returncode is None:
            # wireguard-go removes its tun device and UAPI socket on SIGTERM.
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        uapi_path(ifname).unlink(missing_ok=True)
        log.info("wireguard-go %s stopped", ifname)

    async def close(self) -> None:
        for ifname in list(self._procs):
            await self.remove_device(ifname)
