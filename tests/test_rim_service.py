"""RIM service: bad input gets a 4xx with a reason and the service keeps answering; a served
row is the encoder's vector; SIGKILL of the real ``mim embeddings serve`` under load loses no
acknowledged item and leaves no torn record after restart."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embeddings.build import build_table
from embeddings.encoders import load_item_encoder
from embeddings.rim import RimConfig, RimService, items_table, make_server, NewItem
from embeddings.rim_log import complete_end, read_messages
from encoder_fixtures import png_bytes, png_declaring, tiny_encoders, write_items

REPO = Path(__file__).resolve().parents[1]
BASE_ITEMS = 8


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from mim_rec.encoders import EncoderPair, save_encoders

    return save_encoders(tmp_path_factory.mktemp("rim_encoders"), EncoderPair(tiny_encoders()))


@pytest.fixture(scope="module")
def table(encoder_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rim_table")
    items = write_items(folder / "items.parquet", count=BASE_ITEMS)
    return build_table(load_item_encoder(encoder_dir), items, folder / "table", shard_rows=4)


@contextlib.contextmanager
def service_in_thread(encoder_dir, table, log: Path, **overrides):
    """A service on a free port, serving from a thread: yields (service, port)."""
    config = RimConfig(encoders=str(encoder_dir), log=str(log), table=str(table), **{
        "num_items": 100, "port": 0, "window_ms": 10, "max_batch": 8, "max_request_items": 4,
        "max_body_bytes": 100_000, **overrides})
    service = RimService(config, load_item_encoder(encoder_dir))
    server = make_server(service)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield service, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        service.close()


@pytest.fixture
def service(encoder_dir, table, tmp_path):
    with service_in_thread(encoder_dir, table, tmp_path / "rim.log") as running:
        yield running


def item(item_id, title="red square item", image=None, **extra) -> dict:
    image = png_bytes(item_id % 6, item_id % 3, seed=abs(item_id)) if image is None else image
    return {"item_id": item_id, "title": title, "image": base64.b64encode(image).decode(), **extra}


def request(port: int, method: str, path: str, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    return response.status, payload


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="GIF")
    return buffer.getvalue()


def _red_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


# PIL raises ValueError (Image.open) and SyntaxError (load) for these: the request got no answer.
PNG_SHORT_HEADER = _red_png()[:8] + (5).to_bytes(4, "big") + _red_png()[12:]
PNG_BROKEN_CHUNK = _red_png()[:51] + _red_png()[52:]

BAD_REQUESTS = [
    (b"{not json", 400, "body is not JSON"),
    (b"[" * 40_000 + b"]" * 40_000, 400, "nests too deeply"),  # a RecursionError dropped the connection
    (b'{"items": [{"item_id": 1' + b"0" * 5000 + b'}]}', 400, "body is not JSON"),  # past int()'s digit limit
    ({"items": []}, 400, "at least one item"),
    ({"things": [1]}, 400, "expected"),
    ({"items": [item(i) for i in range(10, 15)]}, 413, "at most 4 per request"),
    ({"items": [item(10, image=b"not an image")]}, 400,
     "row 0, field 'image': not a decodable PNG/JPEG (no image format recognised)"),
    ({"items": [{**item(10), "image": "!!not base64!!"}]}, 400, "field 'image': image is not valid base64"),
    ({"items": [item(10, image=gif_bytes())]}, 400, "image is GIF, not PNG/JPEG"),
    # past PIL's own limit it was "not a decodable PNG/JPEG", the wrong reason
    ({"items": [item(10, image=png_declaring(100_000, 100_000))]}, 400,
     "field 'image': image too large: it declares 10000000000 pixels, over the limit of"),
    ({"items": [item(10, image=PNG_SHORT_HEADER)]}, 400, "field 'image': not a decodable PNG/JPEG (Truncated IHDR"),
    ({"items": [item(10, image=PNG_BROKEN_CHUNK)]}, 400, "field 'image': not a decodable PNG/JPEG (broken PNG"),
    # checked like the title: it failed in the encoder's window, taking other clients' items with it
    (b'{"items": [{"item_id": 10, "title": "t", "raw_item_id": "\\udc00", "image": "x"}]}', 400,
     "field 'raw_item_id': raw_item_id is not valid Unicode"),
    ({"items": [item(10, title="   ")]}, 400, "field 'title': empty title"),
    ({"items": [item(10, title=123)]}, 400, "field 'title': title must be a string, got 123"),
    # taken before: the encoder's tokenizer read all of it in the window other clients' items wait in
    ({"items": [item(10, title="x" * 10_001)]}, 400,
     "field 'title': title longer than 10,000 characters (text towers read only its first "
     "encoders.text.max_length tokens): it has 10,001 characters"),
    ({"items": [item(10), item(-1)]}, 400, "row 1, field 'item_id': item_id must be a non-negative integer"),
    ({"items": [{**item(10), "item_id": "10"}]}, 400, "item_id must be a non-negative integer"),
    ({"items": [{**item(10), "item_id": True}]}, 400, "item_id must be a non-negative integer"),
    ({"items": [{**item(10), "item_id": 2**63}]}, 400, "item_id must be a non-negative integer (int64)"),
    (b'{"items": [{"item_id": 10, "title": "\\ud800", "image": "x"}]}', 400, "title is not valid Unicode"),
    ({"items": [item(100)]}, 400, "outside the id space [0, 100)"),
    ({"items": [item(10), item(10)]}, 400, "row 1, field 'item_id': item 10 also at row 0"),
    ({"items": [item(10, colour="red")]}, 400, "unknown field(s) ['colour']"),
    ({"items": [item(10, category_id=-2)]}, 400, "category_id must be a non-negative int32"),
    ({"items": [item(3)]}, 409, "item 3 is already in the table"),
]


def test_bad_input_gets_a_4xx_with_its_reason_and_the_service_stays_up(service):
    service, port = service
    for body, status, reason in BAD_REQUESTS:
        got, payload = request(port, "POST", "/items", body)
        assert (got, reason in payload.get("error", "")) == (status, True), (body if isinstance(body, bytes)
                                                                              else reason, got, payload)
    for headers, status in [(b"", b"411"), (b"Content-Length: 100001\r\n", b"413"),  # refused unread
                            (b"Content-Length: \xb2\r\n", b"411"), (b"Content-Length: " + b"9" * 5000 + b"\r\n", b"413")]:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"POST /items HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
            assert raw.recv(1000).startswith(b"HTTP/1.1 " + status)
    assert request(port, "GET", "/items/x")[0] == 404 and request(port, "POST", "/other", b"{}")[0] == 404
    assert request(port, "GET", "/items/" + "9" * 5000)[0] == 404  # int() of it raised: no answer at all
    status, payload = request(port, "POST", "/items", {"items": [item(10), item(11)]})
    assert status == 200 and [r["item_id"] for r in payload["items"]] == [10, 11]
    status, payload = request(port, "POST", "/items", {"items": [item(12), item(11)]})
    assert status == 409 and "row 1, field 'item_id': item 11 was already embedded" in payload["error"]
    assert request(port, "GET", "/healthz")[1]["items"] == 2
    assert [m.item_ids.tolist() for _, m in read_messages(service.log.path)] == [[10, 11]]


def test_a_refused_request_leaves_no_body_behind_on_a_kept_alive_connection(service):
    """The 404 of an unknown path (and any GET) left its body unread: the connection's next
    request began with those bytes and got an HTML 400."""
    _, port = service
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for method, path, expected in [("POST", "/item", 404), ("GET", "/healthz", 200), ("GET", "/items/99", 404)]:
        connection.request(method, path, body=json.dumps({"items": [item(10)]}).encode())
        response = connection.getresponse()
        assert (response.status, "error" in json.loads(response.read()) or method == "GET") == (expected, True)
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["items"] == 0
    connection.close()


def test_an_encoder_failure_fails_only_the_request_it_came_from(encoder_dir, table, tmp_path, monkeypatch):
    """Any error but the encoder's DataError failed every request of the window with 500,
    other clients' valid items included."""
    with service_in_thread(encoder_dir, table, tmp_path / "rim.log", window_ms=3000) as (service, port):
        embed, calls = service.encoder.embed_items, []

        def failing_on_13(items, source):
            calls.append(sorted(items.column("item_id").to_pylist()))
            if 13 in calls[-1]:
                raise RuntimeError("the encoder broke on item 13")
            return embed(items, source)

        monkeypatch.setattr(service.encoder, "embed_items", failing_on_13)
        answers = {}
        threads = [threading.Thread(target=lambda i=i: answers.update({i: request(port, "POST", "/items",
                                                                                  {"items": [item(i)]})}))
                   for i in (12, 13)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert calls[0] == [12, 13], calls  # one window held both, as the old code failed them
        assert answers[12][0] == 200 and answers[13][0] == 500, answers
        assert "the encoder broke on item 13" in answers[13][1]["error"]
        assert [m.item_ids.tolist() for _, m in read_messages(service.log.path)] == [[12]]


def test_health_says_so_once_the_log_writer_has_stopped(service, monkeypatch):
    """After a failed write every POST is a 500, but /healthz kept answering ok: nothing told
    an orchestrator to restart the service, as the error asks."""
    import embeddings.rim_log as rim_log

    service, port = service
    assert request(port, "GET", "/healthz")[1]["status"] == "ok"

    def failing_fsync(fd):
        raise OSError(5, "EIO (simulated)")

    monkeypatch.setattr(rim_log.os, "fsync", failing_fsync)
    assert request(port, "POST", "/items", {"items": [item(10)]})[0] == 500
    monkeypatch.undo()
    status, health = request(port, "GET", "/healthz")
    assert status == 503 and health["status"].startswith("log writer stopped: OSError(5, 'EIO (simulated)')")


def test_a_served_row_is_the_encoders_vector_of_the_item(service, encoder_dir):
    service, port = service
    sent = item(42, title="blue dot item 2", category_id=2)
    assert request(port, "POST", "/items", {"items": [sent]})[0] == 200
    status, row = request(port, "GET", "/items/42")
    assert status == 200 and row["arrived_at"] <= row["embedded_at"]
    new = NewItem(42, sent["title"], base64.b64decode(sent["image"]), 2, "42", row["arrived_at"])
    expected = load_item_encoder(encoder_dir).embed_items(items_table([new]), Path("x"))[0].numpy()
    np.testing.assert_allclose(row["vector"], expected, rtol=1e-5, atol=1e-6)
    assert request(port, "GET", "/items/43")[0] == 404


def test_two_requests_racing_for_one_id_embed_it_once(service):
    service, port = service
    results = []
    threads = [threading.Thread(target=lambda: results.append(request(port, "POST", "/items",
                                                                      {"items": [item(60)]})[0]))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [200, 409, 409, 409]
    assert [i for _, m in read_messages(service.log.path) for i in m.item_ids.tolist()] == [60]


# ---------------------------------------------------------------- the real process, killed

@contextlib.contextmanager
def running_service(encoder_dir, log: Path):
    """The real ``mim embeddings serve`` process and its port; killed on the way out."""
    process = subprocess.Popen(
        [sys.executable, "-m", "train.cli", "embeddings", "serve", f"encoders={encoder_dir}", f"log={log}",
         "port=0", "window_ms=5", "max_batch=4", "max_request_items=4"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, f"service did not start: {line}{process.stdout.read() if process.poll() is not None else ''}"
        yield process, int(match.group(1))
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.mark.slow
def test_sigkill_under_load_loses_no_acknowledged_item_and_leaves_no_torn_record(encoder_dir, tmp_path):
    log = tmp_path / "rim.log"
    acknowledged, refused, lock = [], [], threading.Lock()
    images = [png_bytes(c, 0) for c in range(6)]

    def client(port: int, first_id: int) -> None:
        next_id = first_id
        while True:
            ids = list(range(next_id, next_id + 1 + next_id % 3))
            next_id += len(ids)
            try:
                status, _ = request(port, "POST", "/items", {"items": [item(i, image=images[i % 6]) for i in ids]})
            except (OSError, http.client.HTTPException):
                return  # the service died under this request: it was never acknowledged
            with lock:
                (acknowledged if status == 200 else refused).extend(ids)

    with running_service(encoder_dir, log) as (process, port):
        clients = [threading.Thread(target=client, args=(port, k * 1_000_000)) for k in range(4)]
        for thread in clients:
            thread.start()
        time.sleep(2.0)
        process.kill()  # SIGKILL: no chance to flush or close anything
        process.wait()
        for thread in clients:
            thread.join()
    assert len(acknowledged) > 10 and not refused, (len(acknowledged), refused[:5])
    complete = log.stat().st_size
    *_, (last_start, _), (last_end, _) = read_messages(log)
    with log.open("ab") as fh:  # and as if the kill had cut a write short: the first half of a record
        fh.write(log.read_bytes()[last_start:(last_start + last_end) // 2])

    with running_service(encoder_dir, log) as (process, port):  # restart: recovers the log
        health = request(port, "GET", "/healthz")[1]
        assert request(port, "POST", "/items", {"items": [item(acknowledged[0])]})[0] == 409
        process.terminate()
        assert process.wait(timeout=60) == 0, process.stdout.read()

    in_log = [i for _, m in read_messages(log) for i in m.item_ids.tolist()]
    assert len(in_log) == len(set(in_log)), "an item is in the log twice"
    assert set(acknowledged) <= set(in_log), f"lost {sorted(set(acknowledged) - set(in_log))[:5]}"
    assert health["items"] == len(in_log)
    assert health["recovered_bytes"] == complete - complete_end(log) + (last_end - last_start) // 2
    assert complete_end(log) == log.stat().st_size, "a torn record is left in the log"
    print(f"SIGKILL under load: {len(acknowledged)} items acknowledged, all in the log once; {len(in_log)} "
          f"items in the log; {health['recovered_bytes']} torn bytes truncated on restart")


@pytest.mark.parametrize("override, message", [("max_batch=0", "max_batch=0: must be positive"),
                                               ("port=99999", "port=99999: must lie in 0..65535"),
                                               ("max_request_items=100", "max_request_items=100 exceeds max_batch=64"),
                                               # was taken; every larger request then got 503 "retry later" forever
                                               ("max_pending=10", "max_request_items=64 exceeds max_pending=10"),
                                               # overflowed a thread's wait: a dead batcher, or no answer
                                               ("window_ms=.inf", "window_ms=inf: must be finite"),
                                               ("ack_timeout_s=1e10", "ack_timeout_s=10000000000.0: at most"),
                                               ("window_ms=1e13", "window_ms=10000000000000.0: at most")])
def test_serve_refuses_settings_under_which_no_request_succeeds_before_opening_the_log(tmp_path, capsys, override,
                                                                                       message):
    from train.cli import main

    log = tmp_path / "rim.log"
    assert main(["embeddings", "serve", f"encoders={tmp_path / 'absent'}", f"log={log}", override]) == 2
    assert message in capsys.readouterr().err
    assert not log.exists()


def test_a_port_in_use_or_an_unknown_host_is_a_one_line_error(encoder_dir, tmp_path, capsys):
    """Both were OSError tracebacks with status 1."""
    from train.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["embeddings", "serve", f"encoders={encoder_dir}", f"log={tmp_path / 'a.log'}",
                     "host=127.0.0.1", f"port={port}"]) == 2
        err = capsys.readouterr().err
        assert f"host=127.0.0.1 port={port}: cannot listen there" in err and "Traceback" not in err
    assert main(["embeddings", "serve", f"encoders={encoder_dir}", f"log={tmp_path / 'b.log'}",
                 "host=nonexistent.invalid", "port=0"]) == 2
    err = capsys.readouterr().err
    assert "host=nonexistent.invalid port=0: cannot listen there" in err and "Traceback" not in err


def test_serve_refuses_a_num_items_below_the_base_tables_ids_as_the_fold_does(encoder_dir, table, tmp_path):
    """It served: every id below num_items was in the table (409) and every other one outside
    the id space (400), so no request could succeed."""
    from mim_rec.data.errors import ManifestMismatch

    log = tmp_path / "rim.log"
    config = RimConfig(encoders=str(encoder_dir), log=str(log), table=str(table), num_items=BASE_ITEMS - 3)
    with pytest.raises(ManifestMismatch, match=f"num_items={BASE_ITEMS - 3}: .* already spans ids 0..{BASE_ITEMS - 1}"):
        RimService(config, load_item_encoder(encoder_dir)).close()
    assert not log.exists()


def test_serve_refuses_an_encoder_whose_vision_tower_reads_feature_vectors_before_it_loads(tmp_path, capsys,
                                                                                            monkeypatch):
    """POST /items carries an image's bytes only: a service on a 'precomputed' tower started, and
    refused every new item at request time (422, "no 'image_feature' column")."""
    import embeddings.encoders
    from mim_rec.encoders import EncoderPair, EncodersConfig, VisionConfig, save_encoders
    from train.cli import main
    from encoder_fixtures import tiny_text

    encoders = save_encoders(tmp_path / "features", EncoderPair(EncodersConfig(
        vision=VisionConfig(name="precomputed", feature_dim=4), text=tiny_text(), shared_dim=8)))

    def loaded(*args, **kwargs):
        raise AssertionError("the encoder loaded before its vision tower was checked")

    monkeypatch.setattr(embeddings.encoders, "load_item_encoder", loaded)
    log = tmp_path / "rim.log"
    assert main(["embeddings", "serve", f"encoders={encoders}", f"log={log}"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].endswith(
        f"error: encoders={encoders}: its vision tower is 'precomputed' (it reads image_feature vectors), and "
        "POST /items carries an image's bytes, no feature vector, so every new item would be refused; serve an "
        "item encoder whose vision tower reads pixels")
    assert "Traceback" not in err and not log.exists()


def test_a_client_hanging_up_before_its_reply_prints_no_traceback(service, capsys):
    """Every hung-up producer used to print a BrokenPipeError traceback into the service log."""
    _, port = service
    connection = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"items": [item(100)]}).encode()
    connection.sendall(b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, not FIN
    connection.close()
    assert request(port, "GET", "/items/100")[0] in (200, 404)  # still serving
    server = make_server(service[0])  # the same handling, called the way socketserver calls it
    for error, printed in ((BrokenPipeError(), False), (ConnectionResetError(), False), (ValueError("bug"), True)):
        try:
            raise error
        except Exception:
            server.handle_error(None, ("127.0.0.1", 1))
        assert ("Traceback" in capsys.readouterr().err) == printed
    server.server_close()


def test_connections_beyond_max_connections_get_503_and_a_freed_slot_is_reused(encoder_dir, table, tmp_path):
    """Keep-alive clients each hold a thread; past the cap a client is told to retry, not queued
    behind them or given a thread of its own."""
    with service_in_thread(encoder_dir, table, tmp_path / "rim.log", max_connections=2) as (_, port):
        held = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(2)]
        for connection in held:  # one keep-alive request each: both threads are now taken
            connection.request("GET", "/healthz")
            assert connection.getresponse().read() and True
        status, payload = request(port, "GET", "/healthz")
        assert status == 503 and "max_connections" in payload["error"]
        for connection in held:  # still served on their own connections
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["status"] == "ok"
        held[0].close()
        deadline = time.monotonic() + 10
        while (status := request(port, "GET", "/healthz")[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)  # the closed connection's thread gives its slot back when it sees EOF
        assert status == 200
        held[1].close()


def test_max_connections_must_be_positive(tmp_path):
    from mim_rec.config import ConfigError

    with pytest.raises(ConfigError, match="max_connections"):
        RimConfig(encoders="e", log=str(tmp_path / "l"), max_connections=0).validate()


def test_bench_rim_loads_more_clients_than_the_default_connection_cap(encoder_dir, tmp_path):
    """`mim bench rim` sizes the service's connection cap to its clients: with more clients than
    the default 64 every request is still answered 200 and every sampled item is served. A
    client checks its every 10th answer: in 1 s each of the 66 got some 7 answers here, so
    nothing was checked and unserved == 0 said nothing; 3 s give each about 28."""
    from train.bench_rim import RimBenchConfig, run

    config = RimBenchConfig(encoders=str(encoder_dir), clients=RimConfig.max_connections + 2, seconds=3.0,
                            window_ms=5, max_batch=64)
    result = run(config, tmp_path / "bench.log")
    assert result["items"] >= config.clients and result["non_200"] == {}
    assert result["served_checks"] > 0 and result["unserved"] == 0, result


def test_bench_rim_writes_its_result_as_json_like_every_bench(encoder_dir, tmp_path, capsys):
    """docs/bench_train.md says every `mim bench` takes --json; `bench rim` refused it."""
    from train.cli import main as mim

    path = tmp_path / "rim.json"
    assert mim(["bench", "rim", "--json", str(path), f"encoders={encoder_dir}", "clients=1", "seconds=0.5"]) == 0
    result = json.loads(path.read_text())
    assert result["items"] >= 1 and result["non_200"] == {} and result["wall_s"] > 0
    assert "RIM load: 1 client x" in capsys.readouterr().out
