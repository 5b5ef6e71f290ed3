"""Run inside a lab namespace: look for a gateway's zeroconf services from another box.

    python zeroconf_probe.py LOCAL_ADDR TIMEOUT_S

Browses `_dicom._tcp` and `_http._tcp` with plain python-zeroconf (as a workstation would),
and runs the firmware's own Discovery (advertising a stand-in gateway "probe-gw") to see the
gateway as a mesh candidate. Prints one JSON object and exits."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from appliance.web.discovery import DICOM_TYPE, HTTP_TYPE, Advert, Discovery, service_infos


async def main(address: str, timeout: float) -> dict:
    found: dict[str, list[str]] = {DICOM_TYPE: [], HTTP_TYPE: []}

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        found[service_type].append(name)

    advert = Advert("PROBE", 104, 8080, "probe-gw", "clinic", "10.90.9.1", 7480)
    # The stand-in gateway's own adverts are not what we look for.
    own = {info.name for info in service_infos(advert, [address])}
    discovery = Discovery(advert, [address])
    await discovery.start()

    def others(service_type: str) -> list[str]:
        return [n for n in dict.fromkeys(found[service_type]) if n not in own]

    zc = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
    browser = AsyncServiceBrowser(zc.zeroconf, [DICOM_TYPE, HTTP_TYPE], handlers=[on_change])
    out: dict = {"dicom": [], "http": [], "candidates": []}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        if others(DICOM_TYPE) and others(HTTP_TYPE) and discovery.seen():
            break
    for kind, service_type in (("dicom", DICOM_TYPE), ("http", HTTP_TYPE)):
        for name in others(service_type):
            info = AsyncServiceInfo(service_type, name)
            if await info.async_request(zc.zeroconf, 3000):
                out[kind].append({
                    "name": name, "port": info.port,
                    "addresses": info.parsed_addresses(),
                    "txt": {k.decode(): (v or b"").decode() for k, v in info.properties.items()},
                })  # fmt: skip
    out["candidates"] = [c.to_json() for c in discovery.seen()]
    await browser.async_cancel()
    await zc.async_close()
    await discovery.stop()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], float(sys.argv[2])))), flush=True)
