"""The mesh: admitted peers, the shared catalog, chunk exchange and the swarm downloader.

Pieces and who owns what:
- peers.py      the peer registry (state_dir/peers.toml, edited by `dicomesh peer`, reloaded
                live); a request's *source address* maps to a peer, nothing the request says
                about itself does (over WireGuard, cryptokey routing makes addresses identities).
- catalog.py    what exists where: per study a description (C-FIND attributes down to each
                instance's manifest digest) and a holding summary per gateway, replicated by
                pull-based anti-entropy with per-origin sequence numbers (version vectors).
- protocol.py   the HTTP wire formats (/mesh/v1/...), golden-tested.
- server.py     aiohttp server: chunks by hash (streamed, zstd when smaller), `have` queries,
                manifests, catalog pulls; rate-aware serving.
- client.py     aiohttp client per path (peer, local uplink).
- swarm/core.py the I/O-free swarm scheduler (rarest-first, queues sized in seconds of each
                path's measured rate, endgame, stall detection): time and events in,
                requests out; reused by the QoS simulator.
- swarm/download.py the asyncio adapter: drives the core with real fetches, verifies and
                pins chunks durably in the store, completes instances as their chunks land.
- node.py       the mesh subsystem as the lifecycle (app.py) builds it.
"""
