"""``mim bench rim``: load-test the RIM service on localhost.

Starts the real ``mim embeddings serve`` as a child process on a fresh log, then runs
``clients`` concurrent clients (threads with one keep-alive connection each; the service runs
in its own process, so they do not share its interpreter) for ``seconds``, each posting
``items_per_request`` new items at a time and waiting for the answer. A 200 means the items
are durable in the log and served by ``GET /items/<id>``, so the latency of one item is from
sending its request (arrival) to that answer (row served); every 10th answer is checked with a
GET. Reports items/s, p50/p99 latency, the mean window size, any non-200 answers (connection
errors by name) and how many of the checked items were not served, of how many checked.

    mim bench rim encoders=runs/demo/pretrain/encoders world=runs/demo/world clients=8 seconds=30
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np


@dataclass
class RimBenchConfig:
    encoders: str = ""            # item encoder artifact the service runs
    world: str = ""               # send this world's item titles and images (default: synthetic PNGs)
    clients: int = 8
    seconds: float = 30.0
    items_per_request: int = 1
    window_ms: float = 20.0
    max_batch: int = 64
    out: str = ""                 # folder for the service's log (default: a temporary folder)

    def validate(self) -> None:
        """Refuse, before the service starts, settings that would fail in it (a window of 0 ms,
        0 items) or measure nothing (0 clients, 0 s, requests larger than a window: every one a 413)."""
        from mim_rec.config import ConfigError, require_positive

        require_positive(self, ("clients", "seconds", "items_per_request", "window_ms", "max_batch"))
        if self.items_per_request > self.max_batch:
            raise ConfigError(f"items_per_request={self.items_per_request} exceeds max_batch={self.max_batch}: "
                              "the service refuses a request larger than one window (413)")


@dataclass
class ClientStats:
    latencies: List[float] = field(default_factory=list)   # seconds, one per acknowledged item
    statuses: Counter = field(default_factory=Counter)         # HTTP status, or the connection error's name
    checked: int = 0                                        # answers checked by GET /items/<id> (every 10th)
    unserved: int = 0                                       # of those, acknowledged but the GET failed


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("rim", help="load-test the RIM service: items/s, p50/p99 arrival->served",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML/JSON file of RimBenchConfig fields")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON ('-': print it)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="encoders=DIR [world=DIR clients=8 seconds=30 items_per_request=1 "
                             "window_ms=20 max_batch=64 out=DIR]")
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from mim_rec.config import ConfigError, load_config
    from train.bench_cmd import check_json_path, run_and_report

    config = load_config(RimBenchConfig, args.config, args.overrides)
    if not config.encoders:
        raise ConfigError("mim bench rim needs encoders=DIR (the item encoder the service runs)")
    config.validate()  # before out= is made: a refused setting left a new, empty folder behind
    from embeddings.encoders import is_truth_folder
    if is_truth_folder(config.encoders):  # every request would be refused: a 0 items/s "result"
        raise ConfigError(f"encoders={config.encoders}: a synthetic world's truth folder embeds only that world's "
                          "own item ids, and the bench posts new ones; give a stage-1 encoders/ or a C-SFT "
                          "mm_encoder/ artifact")
    if config.out and Path(config.out).exists() and not Path(config.out).is_dir():
        raise ConfigError(f"out={config.out}: a file, not a folder for the service's log")
    check_json_path(args.json)  # before out= is made, as the settings are
    with tempfile.TemporaryDirectory(prefix="rim-bench-") as scratch:
        out = Path(config.out or scratch)
        out.mkdir(parents=True, exist_ok=True)
        run_and_report(lambda: run(config, out / f"rim-{int(time.time())}.log"), format_report, args.json)
    return 0


def run(config: RimBenchConfig, log: Path) -> Dict[str, float]:
    """Serve on a fresh ``log``, load it, stop it; the figures."""
    from embeddings.rim_log import read_messages

    config.validate()
    payloads = _payloads(config.world)
    service, port = _start_service(config, log)
    try:
        status, answer = _post(http.client.HTTPConnection("127.0.0.1", port, timeout=600), payloads, [0])  # warm-up
        if status != 200:  # then every client's request would be refused too, and nothing measured
            raise RuntimeError(f"the RIM service refused the warm-up item ({status}): {answer.strip()[:500]}")
        stats = [ClientStats() for _ in range(config.clients)]
        deadline = time.monotonic() + config.seconds
        started = time.monotonic()
        threads = [threading.Thread(target=_client, args=(port, k, config, payloads, deadline, stats[k]))
                   for k in range(config.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    finally:
        service.terminate()
        service.wait(timeout=120)
    latencies = np.array([x for s in stats for x in s.latencies]) * 1000
    statuses = sum((s.statuses for s in stats), Counter())
    windows = [len(m.item_ids) for _, m in read_messages(log)][1:]  # without the warm-up
    return {"clients": config.clients, "seconds": round(elapsed, 1), "items": len(latencies),
            "items_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else None,  # none acknowledged
            "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else None,
            "mean_window_items": float(np.mean(windows)) if windows else 0.0,
            "non_200": {str(k): v for k, v in statuses.items() if k != 200},
            "served_checks": sum(s.checked for s in stats), "unserved": sum(s.unserved for s in stats)}


def format_report(result: Dict[str, float]) -> str:
    from mim_rec.utils.text import counted

    return (f"RIM load: {counted(result['clients'], 'client')} x {result['seconds']} s: "
            f"{counted(result['items'], 'item')} acknowledged, "
            f"{result['items_per_s']:.1f} items/s; arrival->served p50 {_ms(result['p50_ms'])}, "
            f"p99 {_ms(result['p99_ms'])}; mean window {result['mean_window_items']:.1f} items; "
            f"non-200 answers {result['non_200'] or 'none'}; acknowledged but not served: {result['unserved']} "
            f"of {result['served_checks']} checked (every 10th answer)")


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _start_service(config: RimBenchConfig, log: Path):
    process = subprocess.Popen(
        [sys.executable, "-m", "train.cli", "embeddings", "serve", f"encoders={config.encoders}", f"log={log}",
         "port=0", f"window_ms={config.window_ms}", f"max_batch={config.max_batch}",
         f"max_request_items={config.items_per_request}",
         f"max_connections={config.clients + 1}"],  # the clients and the warm-up's connection
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = process.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not match:
        process.kill()
        output = line + process.stdout.read()
        refusal = re.search(r"^mim embeddings serve: error: (.*)$", output, re.MULTILINE)
        if refusal:  # the service refused its settings (say, encoders=): the user's error, one line
            from mim_rec.config import ConfigError

            raise ConfigError(f"the RIM service did not start: {refusal.group(1)}")
        raise RuntimeError(f"the RIM service did not start: {output}")
    return process, int(match.group(1))


def _payloads(world: str) -> List[dict]:
    """Title/image/category triples to cycle through: a world's items, or synthetic PNGs."""
    if world:
        from mim_rec.data.io import read_items

        items = read_items(Path(world) / "items.parquet").slice(0, 512).to_pylist()
        return [{"title": r["title"], "category_id": r["category_id"],
                 "image": base64.b64encode(r["image"]).decode()} for r in items]
    from PIL import Image

    rng = np.random.default_rng(0)
    payloads = []
    for k in range(64):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
        payloads.append({"title": f"synthetic item {k}", "category_id": k % 8,
                         "image": base64.b64encode(buffer.getvalue()).decode()})
    return payloads


def _post(connection: http.client.HTTPConnection, payloads: List[dict], ids: List[int]) -> Tuple[int, str]:
    """POST ``ids`` as new items; the answer's status and text."""
    body = json.dumps({"items": [{"item_id": i, **payloads[i % len(payloads)]} for i in ids]}).encode()
    connection.request("POST", "/items", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read().decode(errors="replace")


def _client(port: int, k: int, config: RimBenchConfig, payloads: List[dict], deadline: float,
            stats: ClientStats) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    next_id, requests = (k + 1) * 1_000_000_000, 0
    while time.monotonic() < deadline:
        ids = list(range(next_id, next_id + config.items_per_request))
        next_id += len(ids)
        try:
            sent = time.perf_counter()
            status, _ = _post(connection, payloads, ids)
            answered = time.perf_counter()
            stats.statuses[status] += 1
            if status != 200:
                continue
            stats.latencies.extend([answered - sent] * len(ids))
            requests += 1
            if requests % 10 == 0:
                connection.request("GET", f"/items/{ids[-1]}")
                response = connection.getresponse()
                response.read()
                stats.checked += 1
                stats.unserved += response.status != 200
        except (OSError, http.client.HTTPException) as exc:  # counted: a dead client would go unnoticed
            stats.statuses[type(exc).__name__] += 1
            connection.close()  # the next request opens a new connection
    connection.close()
