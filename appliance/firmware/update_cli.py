"""`dicomesh-update`: make keys and bundles (build host), install/recover/status (gateway).

    dicomesh-update keygen --private signing.pem --public update.pub   # build host, once
    dicomesh-update build SRC_DIR --version V --key signing.pem -o dicomesh-V.bundle
    dicomesh-update verify BUNDLE --key update.pub
    dicomesh-update install BUNDLE --root /opt/dicomesh --key /etc/dicomesh/update.pub \
        [--keep /var/lib/dicomesh/updates/installed.bundle]   # what the gateway shares
    dicomesh-update status --root /opt/dicomesh
    dicomesh-update recover --root /opt/dicomesh     # at boot: undo an interrupted update

Exit codes: 0 done/installed, 1 rolled back or failed, 2 bundle rejected or bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from appliance.fileutil import atomic_write
from appliance.firmware import FirmwareError
from appliance.firmware import bundle as bundles
from appliance.firmware.slots import SLOT_MANIFEST, SLOTS, Layout
from appliance.firmware.update import (
    ACTIVATE,
    HEALTH,
    HealthCheck,
    Updater,
    recover,
    write_result,
)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomesh-update", description="firmware updates")
    sub = parser.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser("keygen", help="make an Ed25519 signing key pair")
    keygen.add_argument("--private", type=Path, required=True)
    keygen.add_argument("--public", type=Path, required=True)
    build = sub.add_parser("build", help="sign a directory into a bundle")
    build.add_argument("source", type=Path)
    build.add_argument("--version", required=True)
    build.add_argument("--key", type=Path, required=True, help="private key (PEM)")
    build.add_argument("--kind", choices=bundles.KINDS, default="tree")
    build.add_argument("-o", "--output", type=Path, required=True)
    verify = sub.add_parser("verify", help="check a bundle without installing it")
    verify.add_argument("bundle", type=Path)
    verify.add_argument("--key", type=Path, required=True, help="public key")
    install = sub.add_parser("install", help="install into the inactive slot, switch, check")
    install.add_argument("bundle", type=Path)
    install.add_argument("--root", type=Path, required=True)
    install.add_argument("--key", type=Path, required=True, help="public key")
    install.add_argument("--result", type=Path, help="write the outcome here (JSON)")
    install.add_argument("--remove", action="store_true", help="delete the bundle afterwards")
    install.add_argument(
        "--keep",
        type=Path,
        help="once installed, move the bundle here (same file system): the gateway serves "
        "it to peers that pull updates",
    )
    install.add_argument("--activate-cmd", default=shlex.join(ACTIVATE))
    install.add_argument("--health-cmd", default=shlex.join(HEALTH))
    install.add_argument("--health-timeout", type=float, default=120.0)
    install.add_argument("--health-interval", type=float, default=2.0)
    install.add_argument("--health-passes", type=int, default=3)
    for name in ("status", "recover"):
        p = sub.add_parser(name)
        p.add_argument("--root", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`dicomesh-update` entry point."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except FirmwareError as exc:
        print(f"dicomesh-update: {exc}", file=sys.stderr)
        return 2


def _keygen(args: argparse.Namespace) -> int:
    key = bundles.generate_key()
    if args.private.exists():
        raise FirmwareError(f"{args.private} exists; not overwriting a signing key")
    atomic_write(args.private, bundles.private_key_pem(key), mode=0o600)
    atomic_write(args.public, bundles.public_key_pem(key.public_key()), mode=0o644)
    print(f"signing key {args.private} (keep it off the gateways), public key {args.public}")
    return 0


def _build(args: argparse.Namespace) -> int:
    manifest = bundles.build(
        args.source, args.output, bundles.load_private_key(args.key), args.version, args.kind
    )
    print(f"{args.output}: version {manifest.version}, {len(manifest.files)} files")
    return 0


def _verify(args: argparse.Namespace) -> int:
    key = bundles.load_public_key(args.key)
    scratch = Path(tempfile.mkdtemp(prefix="dicomesh-verify-"))
    try:
        with args.bundle.open("rb") as f:
            manifest = bundles.extract(f, key, scratch / "payload")
    except OSError as exc:
        raise FirmwareError(f"{args.bundle}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(scratch)
    print(f"{args.bundle}: good signature, version {manifest.version}, {len(manifest.files)} files")
    return 0


def _install(args: argparse.Namespace) -> int:
    check = HealthCheck(
        activate=tuple(shlex.split(args.activate_cmd)),
        command=tuple(shlex.split(args.health_cmd)),
        timeout_s=args.health_timeout,
        interval_s=args.health_interval,
        passes=args.health_passes,
    )
    try:
        result = Updater(args.root, bundles.load_public_key(args.key), check).install(args.bundle)
        if args.keep is not None and result.outcome == "installed":
            # The bundle of the version now running replaces the one of the version before.
            try:
                os.replace(args.bundle, args.keep)
            except OSError as exc:
                logging.getLogger(__name__).warning("bundle not kept for peers: %s", exc)
    finally:
        if args.remove:
            args.bundle.unlink(missing_ok=True)
    if args.result:
        write_result(args.result, result)
    text = f"{result.outcome}: version {result.version or '?'}, running slot {result.slot}"
    print(text + (f" ({result.error})" if result.error else ""))
    return {"installed": 0, "rejected": 2}.get(result.outcome, 1)


def _status(args: argparse.Namespace) -> int:
    layout = Layout(args.root)
    active = layout.active()
    out: dict[str, object] = {"active": active, "pending": layout.pending()}
    for name in SLOTS:
        manifest = bundles.read_manifest(layout.slot(name) / SLOT_MANIFEST)
        out[name] = manifest.get("version") if manifest else None
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


def _recover(args: argparse.Namespace) -> int:
    # No key needed: recovery only switches between slots that were verified when installed.
    slot = recover(args.root)
    print(f"rolled back to slot {slot}" if slot else "nothing to recover")
    return 0


_COMMANDS = {
    "keygen": _keygen,
    "build": _build,
    "verify": _verify,
    "install": _install,
    "status": _status,
    "recover": _recover,
}

if __name__ == "__main__":
    sys.exit(main())
