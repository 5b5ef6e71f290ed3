"""Reference peer for bench/ingest.py: a bare pynetdicom Storage SCP that writes each
received data set's bytes to a file, without fsync or any indexing (pynetdicom's ceiling)."""

import sys
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt

_config.LOG_HANDLER_LEVEL = "none"


def main() -> None:
    port, outdir = int(sys.argv[1]), Path(sys.argv[2])
    outdir.mkdir(parents=True, exist_ok=True)

    def on_store(event: evt.Event) -> int:
        name = outdir / str(event.request.AffectedSOPInstanceUID)
        name.write_bytes(event.request.DataSet.getvalue())
        return 0x0000

    ae = AE("BARE")
    ae.maximum_pdu_size = 0
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()
