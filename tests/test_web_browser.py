"""The admin page in a real headless Chromium (Debian's /usr/bin/chromium driven by
Playwright; never a downloaded browser): first-boot setup, live dashboard, settings applied
(seen on a C-ECHO), storage, eviction and uplink settings, peer admission and revocation, a fetch
whose progress bar reaches 100 %, a send of the study to a DICOM node, a QoS simulation,
logout, login. Screenshots of a failing run are kept under the test's tmp_path."""

from __future__ import annotations

import re
import shutil
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dcmtk import StoreSCP, storescu
from gateway import Gateway
from procs import free_port
from studygen import SeriesInfo, generate_ct_series
from webkit import PASSWORD

from appliance.mesh.peers import read_peers

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        shutil.which(CHROMIUM) is None,
        reason="Debian chromium not installed "
        "(apt-get install --no-install-recommends chromium; .ci/run does it)",
    ),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed ([test])")


@pytest.fixture
def page(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.on("console", lambda m: print("console:", m.text))
        page.on("pageerror", lambda e: print("pageerror:", e))
        failed_before = request.session.testsfailed
        try:
            yield page
        finally:
            # The call's report is counted before fixtures are torn down.
            if request.session.testsfailed > failed_before:
                page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
                print(f"screenshot: {tmp_path / 'failure.png'}")
            browser.close()


def _signed_bundle(tmp_path: Path, version: str) -> tuple[Path, Path]:
    """An update bundle signed with a fresh key, and that key's public half."""
    from appliance.firmware import bundle as bundles

    key = bundles.generate_key()
    public = tmp_path / "update.pub"
    public.write_bytes(bundles.public_key_pem(key.public_key()))
    tree = tmp_path / "fw-tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "dicomesh").write_text("#!/bin/sh\n")
    out = tmp_path / f"dicomesh-{version}.bundle"
    bundles.build(tree, out, key, version)
    return out, public


def test_setup_dashboard_settings_peers_fetch_logout(
    gateway_factory: Callable[..., Gateway],
    small_series: SeriesInfo,
    page: object,
    tmp_path: Path,
) -> None:
    fast = {"mesh": {"sync_interval_s": 0.3}, "web": {"events_interval_s": 0.3}}
    holder = gateway_factory(**fast)
    dest_port = free_port()
    node = {"ae_title": "WS_DEST", "host": "127.0.0.1", "port": dest_port}
    bundle, public = _signed_bundle(tmp_path, "9.9.9")
    gw = gateway_factory(
        dicom={"nodes": [node]}, **{**fast, "web": {**fast["web"], "update_key": str(public)}}
    )
    holder.admit(gw)
    gw.admit(holder)
    base = f"http://127.0.0.1:{gw.web_port}"
    p = page  # type: ignore[assignment]
    expect = sync_api.expect

    # Unauthenticated: the page sends us to the login page, which offers first-boot setup.
    p.goto(base + "/")
    expect(p).to_have_url(base + "/login")
    code = (gw.state_dir / "setup-code").read_text().strip()
    p.fill("#setup-code", code)
    p.fill("#setup-password", PASSWORD)
    p.click("#setup-form button[type=submit]")
    expect(p).to_have_url(base + "/")
    expect(p.locator("#live")).to_have_text("live")
    expect(p.locator("#dicom-node")).to_contain_text(gw.ae_title)
    p.evaluate("window.notReloaded = true")

    # Live: instances stored over DICOM show up without a reload.
    expect(p.locator("#store-instances")).to_have_text("0")
    storescu(gw.host, gw.port, gw.ae_title, small_series.paths[:2])
    expect(p.locator("#store-instances")).to_have_text("2")
    expect(p.locator("#dicom-stores")).to_contain_text("2 (")

    # Settings: a new AE title, applied at once (C-ECHO with it as called AE) and on disk.
    p.click("nav a[data-view=settings]")
    expect(p.locator("#dicom-form [name=ae_title]")).to_have_value(gw.ae_title)
    p.fill("#dicom-form [name=ae_title]", "PAGE_AE")
    p.click("#dicom-form button[type=submit]")
    expect(p.locator("#dicom-message")).to_have_text("Saved and applied")
    p.click("#echo-self")
    expect(p.locator("#dicom-message")).to_contain_text("C-ECHO PAGE_AE: success 0x0000")
    saved = tomllib.loads(gw.config_path.read_text())["dicom"]
    assert saved["ae_title"] == "PAGE_AE" and saved["nodes"] == [node]  # the node kept as is

    # Storage applied at once; uplinks saved for the next start, which the banner says.
    p.fill("#store-form [name=max_bytes]", "50 GB")
    p.click("#store-form button[type=submit]")
    expect(p.locator("#store-message")).to_have_text("Saved and applied")
    expect(p.locator("#store-form [name=max_bytes]")).to_have_value("50000000000")
    # Eviction: a 1 kB cache limit, applied at once: the plan (a dry run) sees it crossed.
    p.fill("#evict-form [name=max_bytes]", "1 kB")
    p.fill("#evict-form [name=min_free_bytes]", "0")
    p.click("#evict-form button[type=submit]")
    expect(p.locator("#evict-message")).to_have_text("Saved and applied")
    p.click("#evict-plan-button")
    expect(p.locator("#evict-plan")).to_contain_text("over limits: store holds")
    p.click("#add-uplink")
    uplink = p.locator("#uplink-rows tr.uplink").last
    uplink.locator("[name=name]").fill("adsl1")
    uplink.locator("[name=interface]").fill("eth1")
    p.click("#net-form button[type=submit]")
    expect(p.locator("#net-message")).to_have_text("Saved; applied at the next restart")
    expect(p.locator("#restart-banner")).to_contain_text("net")
    saved = tomllib.loads(gw.config_path.read_text())
    assert saved["store"]["max_bytes"] == 50_000_000_000
    assert saved["net"]["uplinks"][0]["interface"] == "eth1"
    assert saved["evict"]["max_bytes"] == 1000 and saved["evict"]["min_free_bytes"] == 0

    # Peers: admit one from the form; the registry file has it.
    p.click("nav a[data-view=peers]")
    expect(p.locator("#peers")).to_contain_text(holder.mesh_name)
    p.fill("#admit-form [name=name]", "site-z")
    p.fill("#admit-form [name=public_key]", "A" * 43 + "=")
    p.fill("#admit-form [name=addresses]", "10.90.26.1")
    p.click("#admit-form button[type=submit]")
    expect(p.locator("#admit-message")).to_have_text("site-z admitted")
    expect(p.locator("#peers")).to_contain_text("site-z")
    assert "site-z" in {peer.name for peer in read_peers(gw.state_dir / "peers.toml")}
    # Revoke asks first; confirmed, the peer is gone from the page and the registry.
    p.once("dialog", lambda dialog: dialog.accept())
    p.click("#peers button[data-peer=site-z]")
    expect(p.locator("#peers")).not_to_contain_text("site-z")
    assert {peer.name for peer in read_peers(gw.state_dir / "peers.toml")} == {holder.mesh_name}

    # Studies: one held only by the other gateway; fetch it and watch the bar reach 100 %.
    remote = generate_ct_series(tmp_path / "remote", 5, rows=64, cols=64, seed=26)
    storescu(holder.host, holder.port, holder.ae_title, remote.paths)
    p.click("nav a[data-view=studies]")
    for _ in range(50):  # the catalog arrives within a few sync rounds
        p.click("#search-form button[type=submit]")
        if holder.mesh_name in (p.locator("#studies").text_content() or ""):
            break
        p.wait_for_timeout(300)
    row = p.locator("#studies tr", has_text=holder.mesh_name)
    row.locator("button", has_text="Fetch").click()
    p.click("nav a[data-view=dashboard]")
    transfer = p.locator("#transfers tr", has_text=remote.study_uid)
    expect(transfer).to_contain_text("done", timeout=60_000)
    expect(transfer.locator("[role=progressbar]")).to_have_attribute("aria-valuenow", "100")
    expect(p.locator("#store-instances")).to_have_text("7")
    # The peer it came from: online, seen, with the bytes it sent us.
    source = p.locator("#dash-peers tr", has_text=holder.mesh_name)
    expect(source.locator("td").nth(1)).to_have_text("online")
    expect(source.locator("td").nth(2)).not_to_have_text("never")
    expect(source.locator("td").nth(3)).not_to_have_text("0 B")
    assert p.evaluate("window.notReloaded") is True

    # Send the fetched study to a known DICOM node; its progress reaches 5 of 5 instances.
    with StoreSCP(tmp_path / "dest", "WS_DEST", port=dest_port) as scp:
        p.click("nav a[data-view=studies]")
        expect(p.locator("#send-destination")).to_have_value("WS_DEST")
        p.click("#search-form button[type=submit]")
        p.locator("#studies tr", has_text=holder.mesh_name).locator(
            "button", has_text="Send"
        ).click()
        expect(p.locator("#send-message")).to_have_text("Sending to WS_DEST")
        sent = p.locator("#sends tr", has_text=remote.study_uid)
        expect(sent).to_contain_text("done", timeout=30_000)
        expect(sent).to_contain_text("5 of 5 instances")
        assert len(scp.files()) == 5

    # QoS: simulate the page's example scenario and read the run's figures.
    p.click("nav a[data-view=qos]")
    p.click("#simulate-form button[type=submit]")
    expect(p.locator("#qos-runs")).to_contain_text("done", timeout=60_000)
    expect(p.locator("#qos-runs")).to_contain_text("ecg: loss 0.00 %")
    expect(p.locator("#report-link")).to_have_attribute("href", re.compile(r"left=q1&right=q1"))

    # System: upload a signed firmware bundle; it is verified and queued for the updater.
    p.click("nav a[data-view=system]")
    p.set_input_files("#update-form [name=bundle]", str(bundle))
    p.click("#update-form button[type=submit]")
    expect(p.locator("#update-message")).to_contain_text("Version 9.9.9 verified")
    expect(p.locator("#fw-last")).to_have_text("an update is being installed")
    assert (gw.state_dir / "updates" / "incoming.bundle").read_bytes() == bundle.read_bytes()

    # Logout: back to the login page, and the dashboard is closed again.
    p.click("#logout")
    expect(p).to_have_url(base + "/login")
    expect(p.locator("#login-form")).to_be_visible()
    p.goto(base + "/")
    expect(p).to_have_url(re.compile(r".*/login$"))

    # Login: a wrong password is refused and said so; the right one opens the dashboard.
    p.fill("#login-password", "not the password")
    p.click("#login-form button[type=submit]")
    expect(p.locator("#login-message")).to_contain_text("wrong password")
    expect(p).to_have_url(base + "/login")
    p.fill("#login-password", PASSWORD)
    p.click("#login-form button[type=submit]")
    expect(p).to_have_url(base + "/")
    expect(p.locator("#live")).to_have_text("live")
    expect(p.locator("#dicom-node")).to_contain_text("PAGE_AE")
