"""``mim embeddings serve`` (RIM: new items in real time) and ``mim embeddings fold`` (the
window-message log into the next table version)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass


@dataclass
class FoldConfig:
    table: str = ""      # base MM table folder
    log: str = ""        # RIM window-message log
    out: str = ""        # folder of the next table version
    num_items: int = 0   # catalogue size (id space); 0: the base table's id range


def register(embeddings_subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``fold`` to ``mim embeddings``."""
    serve = embeddings_subparsers.add_parser(
        "serve", help="RIM: embed new items as they arrive (HTTP, durable window-message log)",
        description="Serve POST /items (new items: id, title, base64 image) on localhost, embed them in "
                    "batch windows and append each window durably to the log before acknowledging. "
                    "GET /items/<id> serves a row, GET /healthz the counts. Stops on SIGTERM/Ctrl-C.")
    serve.add_argument("--config", default=None, help="YAML/JSON file of RimConfig fields")
    serve.add_argument("overrides", nargs="*", metavar="key=value",
                       help="encoders=DIR log=FILE [table=DIR num_items=N host=127.0.0.1 port=8470 "
                            "window_ms=20 max_batch=64 max_request_items=64 max_body_bytes=N max_connections=64]")
    serve.set_defaults(func=_serve)
    fold = embeddings_subparsers.add_parser(
        "fold", help="write the next MM table version: a table plus the RIM log's new rows",
        description="Fold the window messages a table does not hold yet into a new table folder "
                    "(base parts linked, one new part, manifest naming the base and the log offset).")
    fold.add_argument("--config", default=None, help="YAML/JSON file of FoldConfig fields")
    fold.add_argument("overrides", nargs="*", metavar="key=value",
                      help="table=DIR log=FILE out=DIR [num_items=N]")
    fold.set_defaults(func=_fold)


def _required(config, command: str, *keys: str) -> None:
    from mim_rec.config import ConfigError

    missing = [k for k in keys if not getattr(config, k)]
    if missing:
        raise ConfigError(f"mim embeddings {command} needs {', '.join(f'{k}=...' for k in missing)}")


def _warn_unchecked_ids(config) -> None:
    """A fold refuses an id outside its catalogue or already in its table; a service told
    neither would acknowledge such an item, which then never leaves the log."""

    unchecked = [what for what, given in (("table=", config.table), ("num_items=", config.num_items)) if not given]
    if unchecked:
        print(f"warning: no {' and no '.join(unchecked)}: new ids are not checked against the base table and "
              "the catalogue, so an id a fold will refuse can be acknowledged", file=sys.stderr, flush=True)


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from embeddings.encoders import load_item_encoder
    from embeddings.rim import RimConfig, RimService, make_server
    from mim_rec.config import load_config

    config = load_config(RimConfig, args.config, args.overrides)
    _required(config, "serve", "encoders", "log")
    config.validate()  # before the encoder is loaded or the log opened
    service = RimService(config, load_item_encoder(config.encoders, config.batch_size))
    try:
        server = make_server(service)
    except OSError as err:  # the port is taken, or the host is not this machine's
        service.close()
        from mim_rec.config import ConfigError
        raise ConfigError(f"host={config.host} port={config.port}: cannot listen there "
                          f"({err.strerror or err}); pick another port=, or port=0 for a free one") from err
    host, port = server.server_address[:2]
    health = service.health()
    print(f"RIM serving http://{host}:{port} (encoder {health['encoder']}, log {config.log}: "
          f"{health['items']} items, {health['recovered_bytes']} torn bytes truncated)", flush=True)
    _warn_unchecked_ids(config)
    # serve_forever runs on this thread, and shutdown() waits for it: call it from another one.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.close()
    print(f"RIM stopped: {service.health()['items']} items in {config.log}", flush=True)
    return 0


def _fold(args: argparse.Namespace) -> int:
    from embeddings.rim_fold import fold_log
    from mim_rec.config import load_config
    from mim_rec.data.manifest import read_manifest

    config = load_config(FoldConfig, args.config, args.overrides)
    _required(config, "fold", "table", "log", "out")
    out = fold_log(config.table, config.log, config.out, config.num_items or None)
    rim = read_manifest(out).extra["rim"]
    print(f"MM table {out}: {config.table} + {rim['items']} items from {config.log} "
          f"(bytes {rim['from_offset']}..{rim['offset']})")
    if not rim["items"]:  # an idle period: the version is written, so a job folding each into the next goes on
        print(f"note: nothing to fold: {config.log} holds no complete record past byte {rim['offset']}; {out} "
              f"holds the rows of {config.table} alone (rim.items 0 in its manifest)", file=sys.stderr)
    if rim["unfolded_bytes"]:
        print(f"warning: {config.log}: the {rim['unfolded_bytes']} bytes after byte {rim['offset']} are not a "
              "complete record (one being written, or torn by a crash) and were not folded; a later fold "
              "starts at that byte", file=sys.stderr)
    return 0
