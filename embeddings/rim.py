"""RIM, real-time inference of new items: ``mim embeddings serve``.

A small HTTP service (standard library only) in front of an item encoder::

    POST /items      {"items": [{"item_id": 7, "title": "...", "image": "<base64 PNG/JPEG>",
                                 "category_id": 3, "raw_item_id": "sku-7"}, ...]}
                     -> 200 {"items": [{"item_id", "offset", "arrived_at", "embedded_at"}]}
    GET  /items/<id> -> 200 {"item_id", "vector", "arrived_at", "embedded_at"} (the served row)
    GET  /healthz    -> 200 {"status": "ok", "items", "log_bytes", "pending", ...}

Request threads validate items and queue them; one batcher thread gathers queued requests for
up to ``window_ms`` (or ``max_batch`` items), embeds them in one encoder call, appends one
window message to the log (:mod:`embeddings.rim_log`) and ``fsync``s it, and only then answers
the waiting requests: a 200 means the item is durable. Bad input gets a 4xx with a reason
(the :class:`~mim_rec.data.errors.DataError` text naming item and field) and never stops the
service; duplicates of an id already in the base table, the log or another in-flight request
are 409.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import pyarrow as pa

from mim_rec.data.errors import DataError, ManifestMismatch
from mim_rec.data.schemas import ITEMS
from mim_rec.data.validate import MAX_TITLE_CHARS, TITLE_TOO_LONG

from embeddings.encoders import ItemEncoder
from embeddings.rim_log import (NUM_ITEMS_HINT, RimLog, ServedTable, WindowMessage, check_id_space,
                                check_served_table, holds, read_messages)
from embeddings.table import table_identity

REQUEST_SOURCE = "POST /items"
_ITEM_FIELDS = {"item_id", "title", "image", "category_id", "raw_item_id"}
_INT64_MAX = 2**63 - 1
_INT32_MAX = 2**31 - 1
# How a service restarting on a log whose records its table= would not take can go on instead.
_RESTART_ON_LOG = ("restart on this log with table= set to the table it was served against or a fold of that table "
                   "from this log, or serve into a new log")


@dataclass
class RimConfig:
    encoders: str = ""              # item encoder artifact: the one that built the table
    log: str = ""                   # window-message log file (created if absent, recovered if torn)
    table: Optional[str] = None     # base MM table: its ids are duplicates, its encoder must match
    num_items: int = 0              # catalogue size (the CTR model's MM rows): new ids must be below it; 0: any
    host: str = "127.0.0.1"         # localhost only unless told otherwise
    port: int = 8470                # 0: any free port (printed at start)
    window_ms: float = 20.0         # batch window: the first queued item waits at most this long
    max_batch: int = 64             # items per window (one encoder call, one log record)
    max_request_items: int = 64     # items per POST
    max_body_bytes: int = 8 << 20   # bytes per POST
    max_image_pixels: int = 4096 * 4096
    max_pending: int = 4096         # queued items beyond this are refused with 503 (back-pressure)
    ack_timeout_s: float = 120.0    # a request not durable by then gets 503 (and may still land)
    batch_size: int = 256           # encoder batch size
    max_connections: int = 64       # open client connections (one thread each); more get 503 and are closed

    def validate(self) -> None:
        """Refuse settings under which no request could succeed (before the log is opened)."""
        from mim_rec.config import ConfigError, require_existing, require_not_negative, require_positive

        require_positive(self, ("window_ms", "max_batch", "max_request_items", "max_body_bytes", "max_image_pixels",
                                "max_pending", "ack_timeout_s", "batch_size", "max_connections"))
        require_not_negative(self, ("num_items",))
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port={self.port}: must lie in 0..65535 (0: any free port)")
        for key, seconds in (("window_ms", self.window_ms / 1000), ("ack_timeout_s", self.ack_timeout_s)):
            if seconds > threading.TIMEOUT_MAX:  # a longer wait overflows the thread's timeout
                raise ConfigError(f"{key}={getattr(self, key)}: at most {threading.TIMEOUT_MAX:.3g} s")
        if self.max_request_items > self.max_batch:
            raise ConfigError(f"max_request_items={self.max_request_items} exceeds max_batch={self.max_batch}: "
                              "a request is embedded within one window")
        if self.max_request_items > self.max_pending:
            raise ConfigError(f"max_request_items={self.max_request_items} exceeds max_pending={self.max_pending}: "
                              "a request is queued whole, so a larger one would get 503 (retry later) forever")
        require_existing(self, ("encoders", "table"))  # by key, before the encoder loads
        self._require_pixel_tower()

    def _require_pixel_tower(self) -> None:
        """Refuse an item encoder whose vision tower reads ``image_feature`` vectors, from its
        manifests, before it loads: POST /items carries an image's bytes and no feature vector,
        so every new item was refused at request time (422, "no 'image_feature' column")."""
        from embeddings.encoders import item_encoder_vision
        from mim_rec.config import ConfigError
        from mim_rec.encoders.config import PRECOMPUTED

        vision = item_encoder_vision(self.encoders) if self.encoders else None
        if vision is not None and vision.name == PRECOMPUTED:
            raise ConfigError(f"encoders={self.encoders}: its vision tower is '{PRECOMPUTED}' (it reads image_feature "
                              "vectors), and POST /items carries an image's bytes, no feature vector, so every new "
                              "item would be refused; serve an item encoder whose vision tower reads pixels")


class RequestError(Exception):
    """A request the service refuses: the HTTP status and the reason sent back."""

    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class NewItem:
    item_id: int
    title: str
    image: bytes
    category_id: int
    raw_item_id: str
    arrived_at: float


@dataclass
class _Submission:
    """One request's items, answered together once their window message is durable."""

    items: List[NewItem]
    done: threading.Event = field(default_factory=threading.Event)
    results: Optional[List[dict]] = None
    error: Optional[RequestError] = None


def parse_request(body: bytes, config: RimConfig, arrived_at: float) -> List[NewItem]:
    """Validate a POST body into items; any defect is a :class:`RequestError` with a reason."""
    try:
        payload = json.loads(body)
    except ValueError as exc:  # not UTF-8, not JSON, or an integer past Python's 4300-digit limit
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{REQUEST_SOURCE}: body is not JSON ({exc})") from None
    except RecursionError:  # "[[[[...": the decoder recurses once per level
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{REQUEST_SOURCE}: body nests too deeply to be a request") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("items"), list) or not payload["items"]:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{REQUEST_SOURCE}: expected {{\"items\": [item, ...]}} "
                                                   "with at least one item")
    if len(payload["items"]) > config.max_request_items:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"{REQUEST_SOURCE}: {len(payload['items'])} items, at most {config.max_request_items} "
                           "per request")
    try:
        items = [_parse_item(raw, row, config, arrived_at) for row, raw in enumerate(payload["items"])]
    except DataError as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, str(exc)) from None
    seen: Dict[int, int] = {}
    for row, item in enumerate(items):
        if item.item_id in seen:
            raise RequestError(HTTPStatus.BAD_REQUEST, str(DataError(
                REQUEST_SOURCE, f"item {item.item_id} also at row {seen[item.item_id]}", row, "item_id")))
        seen[item.item_id] = row
    return items


def _parse_item(raw: object, row: int, config: RimConfig, arrived_at: float) -> NewItem:
    def bad(message: str, name: Optional[str] = None) -> DataError:
        return DataError(REQUEST_SOURCE, message, row=row, field=name)

    if not isinstance(raw, dict):
        raise bad("an item must be a JSON object")
    unknown = set(raw) - _ITEM_FIELDS
    if unknown:
        raise bad(f"unknown field(s) {sorted(unknown)}; known: {sorted(_ITEM_FIELDS)}")
    item_id = raw.get("item_id")
    if not _is_int(item_id) or not 0 <= item_id <= _INT64_MAX:
        raise bad(f"item_id must be a non-negative integer (int64), got {item_id!r}", "item_id")
    if config.num_items and item_id >= config.num_items:
        raise bad(f"item_id {item_id} is outside the id space [0, {config.num_items})", "item_id")
    title = raw.get("title")
    if not isinstance(title, str):
        raise bad(f"title must be a string, got {title!r}", "title")
    if not title.strip():
        raise bad("empty title", "title")
    if len(title) > MAX_TITLE_CHARS:  # the encoder's tokenizer would read it all, holding up the window
        raise bad(f"{TITLE_TOO_LONG}: it has {len(title):,} characters", "title")
    try:  # JSON may carry a lone surrogate ("\ud800"), which no tokenizer or log can encode
        title.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(f"title is not valid Unicode ({exc.reason})", "title") from None
    category_id = raw.get("category_id", 0)
    if not _is_int(category_id) or not 0 <= category_id <= _INT32_MAX:
        raise bad(f"category_id must be a non-negative int32, got {category_id!r}", "category_id")
    raw_item_id = raw.get("raw_item_id", str(item_id))
    if not isinstance(raw_item_id, str):
        raise bad("raw_item_id must be a string", "raw_item_id")
    try:  # written to the items table the encoder reads, which cannot hold a lone surrogate
        raw_item_id.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(f"raw_item_id is not valid Unicode ({exc.reason})", "raw_item_id") from None
    return NewItem(item_id, title, _decode_image(raw.get("image"), config, bad), category_id,
                   raw_item_id, arrived_at)


def _decode_image(value: object, config: RimConfig, bad) -> bytes:
    """The image's bytes, once they are known to decode as a PNG/JPEG of sane size."""
    from PIL import UnidentifiedImageError

    from mim_rec.data.images import ImageRefused, open_image
    from mim_rec.encoders.preprocess import IMAGE_DECODE_ERRORS, decode_image

    if not isinstance(value, str) or not value:
        raise bad("image must be a base64 string of PNG/JPEG bytes", "image")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad("image is not valid base64", "image") from None
    try:
        with open_image(io.BytesIO(data)) as image:
            width, height = image.size
    except ImageRefused as exc:
        raise bad(str(exc), "image") from None
    except UnidentifiedImageError:  # its message names only an in-memory buffer
        raise bad("not a decodable PNG/JPEG (no image format recognised)", "image") from None
    except IMAGE_DECODE_ERRORS as exc:
        raise bad(f"not a decodable PNG/JPEG ({exc})", "image") from None
    if width * height > config.max_image_pixels:
        raise bad(f"image is {width}x{height}, above {config.max_image_pixels} pixels", "image")
    try:
        decode_image(data)
    except ValueError as exc:
        raise bad(str(exc), "image") from None
    return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def items_table(items: List[NewItem]) -> pa.Table:
    """New items as rows of the ITEMS contract (``created_at`` = arrival), for the encoder."""
    schema = ITEMS.schema_for(["image"])
    return pa.table({
        "item_id": pa.array([i.item_id for i in items], pa.int64()),
        "raw_item_id": pa.array([i.raw_item_id for i in items], pa.string()),
        "category_id": pa.array([i.category_id for i in items], pa.int32()),
        "title": pa.array([i.title for i in items], pa.string()),
        "created_at": pa.array([datetime.fromtimestamp(int(i.arrived_at), timezone.utc) for i in items],
                               pa.timestamp("s")),
        "image": pa.array([i.image for i in items], pa.binary()),
    }, schema=schema)


class RimService:
    """The RIM service: validation, duplicate refusal, the batch window, the durable log.

    :meth:`submit` is the whole request path without HTTP (the handler is a thin wrapper), so
    tests and embedders can drive it directly.
    """

    def __init__(self, config: RimConfig, encoder: ItemEncoder) -> None:
        config.validate()
        self.encoder = encoder
        self._table_ids = np.zeros(0, dtype=np.int64)
        self._table: Optional[ServedTable] = None  # named in every record: consumers take it only into this table
        self._takes: List[str] = []  # the tables a record of the log may name to go into the table (served_tables)
        self._holds_to = 0           # the log offset up to which the table holds the log's rows (a fold of it)
        if config.table:
            self._table_ids = self._load_table(config.table, config.num_items)
            self._table = ServedTable(str(Path(config.table).resolve()), table_identity(config.table))
            self._holds_to, self._takes = self._log_in_table(config.table, config.log)
        self.config = config
        self.log = RimLog(config.log, encoder.fingerprint, encoder.dim)
        self._served: Dict[int, Tuple[np.ndarray, float, float]] = {}
        try:
            for end, message in read_messages(self.log.path):
                self._check_logged(message, end)
                self._serve(message)
            self._check_id_space()
        except BaseException:
            self.log.close()
            raise
        self._lock = threading.Lock()
        self._in_flight: Set[int] = set()
        self._pending_items = 0
        self._queue: "queue.Queue[Optional[_Submission]]" = queue.Queue()
        self._carry: Optional[_Submission] = None  # did not fit the last window
        self._batcher = threading.Thread(target=self._batch_loop, name="rim-batcher", daemon=True)
        self._batcher.start()

    def _load_table(self, table: str, num_items: int) -> np.ndarray:
        """The base table's sorted ids, once its encoder is known to be the service's and
        ``num_items`` (0: any) to leave room for new ids, as the fold requires of it."""
        from embeddings.rim_fold import new_id_space
        from embeddings.table import table_item_ids
        from mim_rec.data.manifest import require

        manifest = require(table, kind="mm_table")
        if manifest.extra.get("encoder_fingerprint") != self.encoder.fingerprint:
            raise ManifestMismatch(f"{table}: built by encoder {manifest.extra.get('encoder_fingerprint')!r}, "
                                   f"the service runs {self.encoder.fingerprint!r}; new items would land "
                                   "in another vector space")
        new_id_space(table, manifest, num_items)  # below the table's range every request would fail
        return table_item_ids(table)

    @staticmethod
    def _log_in_table(table: str, log: str) -> Tuple[int, List[str]]:
        """How far the table holds the log (:func:`~embeddings.rim_fold.folded_offset`: a log
        rotated at the path a fold of it was made from is refused, as the fold refuses it) and
        the tables a later record may name to go into it (:func:`~embeddings.rim_fold.served_tables`)."""
        from embeddings.rim_fold import folded_offset, served_tables
        from mim_rec.data.manifest import require

        return folded_offset(table, log), served_tables(table, require(table, kind="mm_table"), log)

    def _check_logged(self, message: WindowMessage, end: int) -> None:
        """Refuse to go on with a log whose records (those past what the table holds) a fold into
        this service's ``table=`` would not take whole: the fold and the live apply refused such
        a log only later, after this service had acknowledged more items into it. A record served
        against a table refuses a service with none (it would check new ids against nothing);
        one served against none is checked against the table now, as the fold will check it."""
        if end <= self._holds_to:
            return
        if self._table is None:
            if message.table is not None:
                raise ManifestMismatch(f"{self.log.path}: the record ending at byte {end} was served against the "
                                       f"table {message.table.path} (manifest {message.table.fingerprint}), and "
                                       f"this service has no table=, so it would check new ids against none; "
                                       f"{_RESTART_ON_LOG}")
            return
        check_served_table(message, self._takes, self.log.path, end, f"table={self.config.table}", _RESTART_ON_LOG)
        if message.table is None:
            held = message.item_ids[holds(self._table_ids, message.item_ids)]
            if len(held):
                raise DataError(str(self.log.path), f"the record ending at byte {end} was served against no table "
                                f"and holds item {held[0]}, which table={self.config.table} holds: a fold or live "
                                "apply into it would refuse this log; serve against that table into a new log",
                                field="item_id")

    def _check_id_space(self) -> None:
        """Refuse to go on with a log holding an id outside ``num_items`` (where given; an
        earlier start's may have been larger), by the fold's rule and with its message: the
        fold refused the log only later, after this service had acknowledged more items into
        it. The ids are those the start's one pass over the log served, in log order."""
        if self.config.num_items:
            check_id_space(np.fromiter(self._served, np.int64, len(self._served)), self.config.num_items,
                           self.log.path, NUM_ITEMS_HINT)

    # ------------------------------------------------------------------ request path

    def submit(self, body: bytes, arrived_at: Optional[float] = None) -> List[dict]:
        """Validate, reserve the ids, wait until the items are durable; the per-item results."""
        items = parse_request(body, self.config, time.time() if arrived_at is None else arrived_at)
        submission = _Submission(items)
        with self._lock:
            for row, item in enumerate(items):
                reason = self._duplicate(item.item_id)
                if reason:
                    raise RequestError(HTTPStatus.CONFLICT, str(DataError(REQUEST_SOURCE, reason, row, "item_id")))
            if self._pending_items + len(items) > self.config.max_pending:
                raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE,
                                   f"{self._pending_items} items are waiting to be embedded; retry later")
            self._in_flight.update(item.item_id for item in items)
            self._pending_items += len(items)
        self._queue.put(submission)
        if not submission.done.wait(self.config.ack_timeout_s):
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE,
                               f"not durable after {self.config.ack_timeout_s} s; the items may still land: "
                               "check GET /items/<id> before resending")
        if submission.error is not None:
            raise submission.error
        return submission.results

    def _duplicate(self, item_id: int) -> Optional[str]:
        if item_id in self.log.item_ids:
            return f"item {item_id} was already embedded (it is in the log)"
        if item_id in self._in_flight:
            return f"item {item_id} is being embedded by another request"
        at = np.searchsorted(self._table_ids, item_id)
        if at < len(self._table_ids) and self._table_ids[at] == item_id:
            return f"item {item_id} is already in the table {self.config.table}"
        return None

    def served_row(self, item_id: int) -> Optional[dict]:
        row = self._served.get(item_id)
        if row is None:
            return None
        vector, arrived_at, embedded_at = row
        return {"item_id": item_id, "vector": vector.tolist(), "arrived_at": arrived_at,
                "embedded_at": embedded_at}

    def health(self) -> dict:
        """Counts, and ``status``: "ok", or why no request can succeed (the log writer stopped
        after a failed write: restart the service, whose reopen checks the log)."""
        status = f"log writer stopped: {self.log.failed}; restart the service" if self.log.failed else "ok"
        return {"status": status, "encoder": self.encoder.fingerprint, "dim": self.encoder.dim,
                "items": len(self._served), "records": self.log.records, "log_bytes": self.log.end,
                "recovered_bytes": self.log.recovered_bytes, "pending": self._pending_items}

    # ------------------------------------------------------------------ batch window

    def _next_window(self) -> Optional[List[_Submission]]:
        """Queued submissions for one window, or None at shutdown."""
        first, self._carry = self._carry or self._queue.get(), None
        if first is None:
            return None
        window, count = [first], len(first.items)
        deadline = time.monotonic() + self.config.window_ms / 1000
        while count < self.config.max_batch:
            try:
                nxt = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)  # finish this window, then stop
                break
            if count + len(nxt.items) > self.config.max_batch:
                self._carry = nxt      # it opens the next window
                break
            window.append(nxt)
            count += len(nxt.items)
        return window

    def _batch_loop(self) -> None:
        while True:
            window = self._next_window()
            if window is None:
                return
            for submission, error in self._embed_and_log(window):
                with self._lock:
                    self._in_flight.difference_update(item.item_id for item in submission.items)
                    self._pending_items -= len(submission.items)
                submission.error = error
                submission.done.set()

    def _embed_and_log(self, window: List[_Submission]) -> List[Tuple[_Submission, Optional[RequestError]]]:
        """Embed a window and append it durably: each submission with its error (None: durable)."""
        items = [item for submission in window for item in submission.items]
        try:
            vectors = self._embed(items)
        except Exception as exc:  # the service must stay up; the client learns why
            if len(window) > 1:  # isolate the request that failed; the others still land
                return [outcome for submission in window for outcome in self._embed_and_log([submission])]
            if isinstance(exc, DataError):  # the encoder refused this request's items
                return [(window[0], RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc)))]
            return [(window[0], RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, f"embedding failed: {exc!r}"))]
        message = WindowMessage(np.array([i.item_id for i in items], np.int64), vectors,
                                self.encoder.fingerprint, np.array([i.arrived_at for i in items]), time.time(),
                                self._table)
        try:
            end = self.log.append(message)
        except OSError as exc:
            return [(s, RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, f"log append failed: {exc}")) for s in window]
        self._serve(message)
        for submission in window:
            submission.results = [{"item_id": i.item_id, "offset": end, "arrived_at": i.arrived_at,
                                   "embedded_at": message.embedded_at} for i in submission.items]
        return [(submission, None) for submission in window]

    def _embed(self, items: List[NewItem]) -> np.ndarray:
        vectors = self.encoder.embed_items(items_table(items), Path(REQUEST_SOURCE)).float().cpu().numpy()
        if vectors.shape != (len(items), self.encoder.dim) or not np.isfinite(vectors).all():
            raise ValueError(f"encoder returned {vectors.shape} (finite: {np.isfinite(vectors).all()}) "
                             f"for {len(items)} items")
        return vectors.astype(np.float32)

    def _serve(self, message: WindowMessage) -> None:
        for item_id, vector, arrived_at in zip(message.item_ids, message.vectors, message.arrived_at):
            self._served[int(item_id)] = (vector, float(arrived_at), message.embedded_at)

    def close(self) -> None:
        """Finish the queued windows, then close the log."""
        self._queue.put(None)
        self._batcher.join()
        self.log.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: a client reuses its connection
    timeout = 30                    # a client that stops sending mid-body frees its thread
    service: RimService             # set on the subclass made by make_server

    def do_POST(self) -> None:
        arrived_at = time.time()
        if self.path != "/items":  # its body is left unread, so the connection cannot be reused
            return self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: POST {self.path}"}, close=True)
        length = self.headers.get("Content-Length")
        if length is None or not re.fullmatch(r"[0-9]+", length):  # str.isdigit() also takes "²"
            return self._reply(HTTPStatus.LENGTH_REQUIRED,
                               {"error": "a Content-Length header of decimal digits is required"}, close=True)
        if len(length) > 19 or int(length) > self.service.config.max_body_bytes:
            return self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               {"error": f"body of {length} bytes, at most {self.service.config.max_body_bytes}"},
                               close=True)
        body = self.rfile.read(int(length))
        try:
            self._reply(HTTPStatus.OK, {"items": self.service.submit(body, arrived_at)})
        except RequestError as exc:
            self._reply(exc.status, {"error": exc.reason})

    def do_GET(self) -> None:
        # A GET's body is never read: the next request on this connection would start inside it.
        close = self.headers.get("Content-Length", "0").strip() not in ("", "0") or "Transfer-Encoding" in self.headers
        if self.path == "/healthz":  # 503 once no request can succeed, so an orchestrator restarts it
            health = self.service.health()
            status = HTTPStatus.OK if health["status"] == "ok" else HTTPStatus.SERVICE_UNAVAILABLE
            return self._reply(status, health, close=close)
        match = re.fullmatch(r"/items/([0-9]{1,19})", self.path)  # an int64 id; longer ones are not served
        row = self.service.served_row(int(match.group(1))) if match else None
        if row is None:
            return self._reply(HTTPStatus.NOT_FOUND, {"error": f"nothing served at {self.path}"}, close=close)
        self._reply(HTTPStatus.OK, row, close=close)

    def _reply(self, status: HTTPStatus, payload: dict, close: bool = False) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        """Quiet: one line per request would swamp the log under load (GET /healthz has counts)."""


class _RimHttpServer(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` of them.

    Keep-alive clients hold their thread between requests, so without a cap a crowd of idle
    producers (or a connection leak in one) grows the thread count without bound. A connection
    beyond the cap gets a 503 with ``Retry-After`` from the accepting thread and is closed."""

    daemon_threads = True

    def __init__(self, address: Tuple[str, int], handler: type, max_connections: int) -> None:
        # socketserver's listen backlog is 5: a burst of clients connecting at once overflowed it
        # and some of them were reset. Let the kernel queue as many as may be served.
        self.request_queue_size = max(self.request_queue_size, max_connections)
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse_busy(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nothing else will give the slot back
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse_busy(self, request) -> None:
        body = json.dumps({"error": f"{self.max_connections} connections open (max_connections); "
                                    "retry later"}).encode()
        head = (f"HTTP/1.1 {HTTPStatus.SERVICE_UNAVAILABLE.value} {HTTPStatus.SERVICE_UNAVAILABLE.phrase}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Retry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)  # never let one slow client stall the accepting thread
            request.sendall(head + body)
        except OSError:
            pass  # it went away; closing it is all that is left

    def handle_error(self, request, client_address) -> None:
        """A client that hung up before its reply (a timed-out producer, a load balancer's
        probe) is routine: its items were already queued, and a traceback per hang-up would bury
        the real errors in the log. Anything else is still printed."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def make_server(service: RimService) -> ThreadingHTTPServer:
    """An HTTP server for ``service`` on ``config.host:config.port`` (not yet serving)."""
    handler = type("RimHandler", (_Handler,), {"service": service})
    return _RimHttpServer((service.config.host, service.config.port), handler, service.config.max_connections)
