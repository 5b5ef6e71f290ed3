#!/usr/bin/env python3
"""One libtorrent peer for bench/swarm.py: a seeder (a source) or the leecher (the downloader).

TCP only: uTP stalled behind the lab's tbf queues (its delay-based congestion control backs
off from the 200 ms buffer), so both uTP directions are off. No tracker, DHT, LSD, UPnP:
the leecher is told the seeders' addresses and connects to them directly.

    torrent_peer.py seed  TORRENT SAVE_DIR ADDR PORT
    torrent_peer.py leech TORRENT SAVE_DIR ADDR PORT --peer ADDR:PORT ... [--timeout S]

Both print ``READY`` once listening. The leecher then prints one JSON line
``{"start": t0, "done": t1}`` on CLOCK_MONOTONIC (add_torrent -> torrent_finished_alert) and
exits 0, or ``{"error": ...}`` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

import libtorrent as lt


def session(addr: str, port: int) -> lt.session:
    """A session listening on ``addr:port`` over TCP only, with no peer discovery."""
    ses = lt.session(
        {
            "listen_interfaces": f"{addr}:{port}",
            "outgoing_interfaces": addr,
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "alert_mask": lt.alert_category.status | lt.alert_category.error,
        }
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ses.wait_for_alert(200)
        for a in ses.pop_alerts():
            if isinstance(a, lt.listen_succeeded_alert):
                return ses
            if isinstance(a, lt.listen_failed_alert):
                raise SystemExit(f"listen on {addr}:{port} failed: {a.message()}")
    raise SystemExit(f"no listen_succeeded_alert for {addr}:{port} in 10 s")


def params(torrent: str, save: str, flags: int) -> lt.add_torrent_params:
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(torrent)
    atp.save_path = save
    atp.flags = flags
    return atp


def seed(args: argparse.Namespace) -> int:
    ses = session(args.addr, args.port)
    # seed_mode: trust the file (it is the payload itself); pieces are checked when first sent.
    ses.add_torrent(params(args.torrent, args.save, lt.torrent_flags.seed_mode))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("READY", flush=True)
    while not stop.wait(0.5):
        ses.pop_alerts()  # keep the alert queue short
    return 0


def leech(args: argparse.Namespace) -> int:
    ses = session(args.addr, args.port)
    print("READY", flush=True)
    start = time.monotonic()
    handle = ses.add_torrent(params(args.torrent, args.save, 0))
    for peer in args.peer:
        host, port = peer.rsplit(":", 1)
        handle.connect_peer((host, int(port)))
    deadline = start + args.timeout
    while time.monotonic() < deadline:
        ses.wait_for_alert(100)
        for a in ses.pop_alerts():
            if isinstance(a, lt.torrent_finished_alert):
                print(json.dumps({"start": start, "done": time.monotonic()}), flush=True)
                return 0
            if isinstance(a, lt.torrent_error_alert):
                print(json.dumps({"error": a.message()}), flush=True)
                return 1
    status = handle.status()
    print(json.dumps({"error": f"timeout after {args.timeout} s", "progress": status.progress}))
    return 1


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("seed", "leech"))
    ap.add_argument("torrent")
    ap.add_argument("save")
    ap.add_argument("addr")
    ap.add_argument("port", type=int)
    ap.add_argument("--peer", action="append", default=[], help="seeder ADDR:PORT (leech)")
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    return seed(args) if args.mode == "seed" else leech(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
