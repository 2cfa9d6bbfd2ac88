"""The ZeroMQ runtime on the tiny engines, loopback only: every task through the server
equals the in-process pipeline (streaming, image reuse, staged mode), and the server
survives bad input, killed workers, load, untrusted peers and shutdown."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import zmq

from conftest import REPO
from earthgptx.generation import GenerationConfig
from earthgptx.imageio import read_image
from earthgptx.processing import VisualPrompts
from runtime.client import Client, ServerError, ServerUnavailable
from runtime.protocol import PROTOCOL, REQUEST, SERVICE, ErrorCode, Message
from runtime.server import ServeOptions, serve_in_thread

SAR = "../shared/data/sar/hrsid/P0094_0_800_3000_3800.png"
ANY_PORT = "tcp://127.0.0.1:*"  # the server binds a free port; tests read it back from opts.bind


def running(engines, **options):
    return serve_in_thread(ServeOptions(engines=engines, bind=options.pop("bind", None) or ANY_PORT, **options))


@pytest.fixture(scope="module")
def sar(data_root):
    return np.asarray(read_image(REPO / SAR).data)


@pytest.fixture(scope="module")
def reference(tiny_build):
    from runners.engines import open_predictor

    return open_predictor(tiny_build[0], "cpu")


@pytest.fixture(scope="module")
def server(tiny_build):
    with running(tiny_build[0], workers=2, threads=1) as s:
        yield s


def connect(server, **kw) -> Client:
    return Client(server.opts.bind, timeout_s=kw.pop("timeout_s", 30), retries=kw.pop("retries", 1), **kw)


REQUESTS = [  # (task, text, points, boxes, max_new_tokens)
    ("caption", "Describe the image.", [], [], 6),
    ("region", "What is <region1>?", [(400, 400)], [], 5),
    ("grounding", "Where is the ship?", [], [], 4),
    ("segment", "Segment the ship.", [(400, 400)], [(300, 320, 520, 480)], 3),
    ("click", "", [(400, 400)], [], 0),
]


def assert_same(out: dict, ref: dict) -> None:
    assert out["text"] == ref["text"] and out["task"] == ref["task"]
    assert out["masks"] == ref["masks"]
    np.testing.assert_allclose(out["boxes"], ref["boxes"], atol=1e-2)
    np.testing.assert_allclose(out["scores"], ref["scores"], atol=1e-5)


@pytest.mark.parametrize("task, text, points, boxes, n", REQUESTS)
def test_every_task_equals_in_process(server, reference, sar, task, text, points, boxes, n):
    ref = reference.predict(sar, "sar", text, VisualPrompts(points, boxes, []), task=task,
                            generation=GenerationConfig(max_new_tokens=n)).to_json()
    with connect(server) as c:
        out = c.predict(sar, "sar", text, points, boxes, task=task, generation={"max_new_tokens": n})
    assert_same(out, ref)


def test_streaming_upload_and_reuse(server, reference, sar):
    pieces = []
    with connect(server) as c:
        key = c.upload(sar, "sar")
        assert c.uploaded == {(key, "sar")}
        out = c.predict(sar, "sar", "Describe the image.", task="caption", generation={"max_new_tokens": 8},
                        stream=True, on_text=pieces.append)
        assert "".join(pieces) == out["text"] and len(pieces) >= 2
        # sent by id only: some worker has it cached, or the client resends it
        again = c.predict(sar, "sar", "Segment the ship.", [(400, 400)], task="click")
    ref = reference.predict(sar, "sar", "Describe the image.", task="caption",
                            generation=GenerationConfig(max_new_tokens=8)).to_json()
    assert out["text"] == ref["text"] and out["image_id"] == key == again["image_id"]


def test_staged_mode_gives_the_same_answers(tiny_build, reference, sar):
    with running(tiny_build[0], workers=1, staged=True, threads=1) as s, connect(s) as c:
        assert {w.stage for w in s.broker.workers.values()} == {"vision", "language"}
        for task, text, points, boxes, n in REQUESTS:
            ref = reference.predict(sar, "sar", text, VisualPrompts(points, boxes, []), task=task,
                                    generation=GenerationConfig(max_new_tokens=n)).to_json()
            out = c.predict(sar, "sar", text, points, boxes, task=task, generation={"max_new_tokens": n})
            assert_same(out, ref)
        with pytest.raises(ServerError) as err:
            c.predict(sar, "sar", "x", [(900, 10)], task="click")
        assert err.value.code == ErrorCode.BAD_REQUEST


def test_batching_worker_decodes_concurrent_requests_together(tiny_build, reference, sar):
    """One worker with --batch 3: requests that arrive while a long caption decodes join its
    decode steps (their ``decode_batch`` > 1), stream, and answer exactly what they answer
    alone."""
    jobs = [("caption", "Describe the image.", [], [], 300), ("region", "What is <region1>?", [(400, 400)], [], 12),
            ("segment", "Segment the ship.", [(400, 400)], [], 8)]
    results, pieces = [None] * len(jobs), [[] for _ in jobs]
    with running(tiny_build[0], workers=1, batch=3, threads=1) as s:
        assert [w.slots for w in s.broker.workers.values()] == [3]

        def ask(i: int) -> None:
            task, text, points, boxes, n = jobs[i]
            with connect(s, timeout_s=120) as c:
                results[i] = c.predict(sar, "sar", text, points, boxes, task=task, generation={"max_new_tokens": n},
                                       stream=True, on_text=pieces[i].append)

        first = threading.Thread(target=ask, args=(0,))
        first.start()
        while not pieces[0] and first.is_alive():  # the caption is decoding
            time.sleep(0.005)
        others = [threading.Thread(target=ask, args=(i,)) for i in (1, 2)]
        for t in others:
            t.start()
        for t in [first, *others]:
            t.join(180)
    for (task, text, points, boxes, n), out, streamed in zip(jobs, results, pieces):
        ref = reference.predict(sar, "sar", text, VisualPrompts(points, boxes, []), task=task,
                                generation=GenerationConfig(max_new_tokens=n)).to_json()
        assert_same(out, ref)
        assert "".join(streamed) == out["text"]
    assert len(results[0]["text"]) > 100 and results[0]["finish_reason"] == "length"  # long enough to share
    assert results[1]["decode_batch"] >= 2 and results[2]["decode_batch"] >= 2


# -- bad input ----------------------------------------------------------------------
def raw_request(address: str, frames: list, timeout_s: float = 10) -> dict:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        assert sock.poll(int(timeout_s * 1000)), "no reply"
        reply = sock.recv_multipart()
        assert reply[:2] == [b"", PROTOCOL] and reply[3] == SERVICE
        return json.loads(reply[4])
    finally:
        sock.close()


def envelope(header: dict, tensors=None) -> list:
    return [b"", PROTOCOL, REQUEST, SERVICE, *[bytes(f) for f in Message(header, tensors or {}).frames()]]


def image_header(**kw) -> dict:
    return {"id": uuid.uuid4().hex, "task": "click", "points": [[5, 5]], "image": {"modality": "sar"}, **kw}


GRAY = np.zeros((32, 32), np.uint8)
BAD = [
    ("too few frames", [b"", PROTOCOL, REQUEST], ErrorCode.MALFORMED),
    ("no delimiter", [PROTOCOL, REQUEST, SERVICE, b"{}", b""], ErrorCode.MALFORMED),
    ("other protocol", [b"", b"MDPC02", REQUEST, SERVICE, b"{}"], ErrorCode.MALFORMED),
    ("wrong version", [b"", b"EGX/2", REQUEST, SERVICE, b'{"id": "a"}'], ErrorCode.BAD_VERSION),
    ("bad command", [b"", PROTOCOL, b"\x09", SERVICE, b'{"id": "a"}'], ErrorCode.MALFORMED),
    ("header not json", [b"", PROTOCOL, REQUEST, SERVICE, b"\xff{"], ErrorCode.MALFORMED),
    ("header a list", [b"", PROTOCOL, REQUEST, SERVICE, b"[1]"], ErrorCode.MALFORMED),
    ("no id", [b"", PROTOCOL, REQUEST, SERVICE, b'{"task": "ping"}'], ErrorCode.MALFORMED),
    ("unknown service", [b"", PROTOCOL, REQUEST, b"mmi.nope", b'{"id": "a", "task": "ping"}'],
     ErrorCode.UNKNOWN_SERVICE),
    ("unknown task", envelope({"id": "t1", "task": "teleport"}), ErrorCode.UNKNOWN_TASK),
    ("buffer count", envelope({"id": "t2", "task": "ping"}) + [b"xx"], ErrorCode.MALFORMED),
    ("float16 dtype", envelope(image_header(), {"image": GRAY.astype(np.float16)}), ErrorCode.BAD_REQUEST),
    ("size mismatch", [*envelope(image_header(), {"image": GRAY})[:-1], b"\0" * 10], ErrorCode.BAD_REQUEST),
    ("4-d image", envelope(image_header(), {"image": np.zeros((1, 2, 3, 5), np.uint8)}), ErrorCode.BAD_REQUEST),
    ("5 channels", envelope(image_header(), {"image": np.zeros((8, 8, 5), np.uint8)}), ErrorCode.BAD_REQUEST),
    ("bad modality", envelope(image_header(image={"modality": "lidar"}), {"image": GRAY}), ErrorCode.BAD_REQUEST),
    ("point outside", envelope(image_header(points=[[40, 5]]), {"image": GRAY}), ErrorCode.BAD_REQUEST),
    ("point not numbers", envelope(image_header(points=[["a", 5]]), {"image": GRAY}), ErrorCode.BAD_REQUEST),
    ("optical grey", envelope(image_header(image={"modality": "optical"}), {"image": GRAY}), ErrorCode.BAD_REQUEST),
    ("unknown image id", envelope(image_header(image={"modality": "sar", "id": "0" * 64})),
     ErrorCode.IMAGE_UNKNOWN),
    ("wrong image id", envelope(image_header(image={"modality": "sar", "id": "0" * 64}), {"image": GRAY}),
     ErrorCode.BAD_REQUEST),
    ("bad generation", envelope(image_header(task="caption", generation={"max_new_tokens": "9"}), {"image": GRAY}),
     ErrorCode.BAD_REQUEST),
    ("too many tokens", envelope(image_header(task="caption", generation={"max_new_tokens": 10**6}),
                                 {"image": GRAY}), ErrorCode.BAD_REQUEST),
    ("oversized", envelope({"id": "big", "task": "ping"}, {"payload": np.zeros(2**20 + 1, np.uint8)}),
     ErrorCode.TOO_LARGE),
]


@pytest.fixture(scope="module")
def small_server(tiny_build):
    with running(tiny_build[0], workers=1, threads=1, max_request_bytes=2**20, max_queue=1) as s:
        yield s


@pytest.mark.parametrize("name, frames, code", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_typed_errors_and_the_server_keeps_serving(small_server, name, frames, code):
    reply = raw_request(small_server.opts.bind, frames)
    assert reply["event"] == "error" and reply["error"]["code"] == code, reply
    assert reply["error"]["message"]
    with connect(small_server) as c:
        assert c.ping()["event"] == "pong"


def test_full_queue_answers_busy(small_server, sar):
    """One worker, a queue of one: requests sent at once get a result or 'busy', each once."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(small_server.opts.bind)
    small = sar[:256, :256].copy()
    ids = [f"busy-{i}" for i in range(6)]
    for rid in ids:
        sock.send_multipart(envelope({"id": rid, "task": "caption", "image": {"modality": "sar"},
                                      "generation": {"max_new_tokens": 200}}, {"image": small}))
    replies = []
    while len(replies) < len(ids) and sock.poll(30000):
        replies.append(json.loads(sock.recv_multipart()[4]))
    sock.close()
    assert sorted(r["id"] for r in replies) == sorted(ids)
    codes = [r["error"]["code"] if r["event"] == "error" else "ok" for r in replies]
    assert codes.count("ok") >= 1 and codes.count(ErrorCode.BUSY) >= 1, codes
    assert set(codes) <= {"ok", ErrorCode.BUSY}


# -- faults and load -----------------------------------------------------------------
def test_killed_worker_request_is_retried_once(server, reference, sar):
    header = {"id": uuid.uuid4().hex, "task": "caption", "text": "Describe the image.",
              "image": {"modality": "sar"}, "generation": {"max_new_tokens": 1024}}
    answered_before = server.broker.answered
    result = {}
    with connect(server, timeout_s=60, retries=0) as c:
        t = threading.Thread(target=lambda: result.update(c.request(header, {"image": sar}).header))
        t.start()
        deadline = time.monotonic() + 30
        victim = None
        while victim is None and time.monotonic() < deadline:
            victim = next((w.pid for w in list(server.broker.workers.values())
                           if any(j.id == header["id"] for j in w.jobs.values())), None)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        t.join(120)
    ref = reference.predict(sar, "sar", "Describe the image.", task="caption",
                            generation=GenerationConfig(max_new_tokens=1024))
    assert result["event"] == "result" and result["result"]["text"] == ref.text
    assert server.broker.answered == answered_before + 1
    deadline = time.monotonic() + 60  # the dead worker is replaced
    while server.broker.ready_workers() < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.broker.ready_workers() == 2 and victim not in server.processes


def test_lazy_pirate_retries_reach_the_running_request(server, sar):
    """A client that times out and resends (fresh socket, same id) gets the one answer."""
    before = server.broker.answered
    with connect(server, timeout_s=0.2, retries=50) as c:
        out = c.request({"task": "caption", "text": "Describe the image.", "image": {"modality": "sar"},
                         "generation": {"max_new_tokens": 1024}}, {"image": sar}).header
    assert out["event"] == "result" and len(out["result"]["text"]) > 0
    assert server.broker.answered == before + 1


def test_hung_worker_is_replaced(server, sar):
    """A worker that stops answering heartbeats (SIGSTOP) is declared dead, killed and replaced."""
    victim = next(iter(server.broker.workers.values())).pid
    os.kill(victim, signal.SIGSTOP)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (victim in server.processes or server.broker.ready_workers() < 2):
        time.sleep(0.1)
    assert victim not in server.processes and server.broker.ready_workers() == 2
    with connect(server) as c:
        assert c.predict(sar, "sar", "", [(400, 400)], task="click")["masks"]


def test_retry_with_the_same_id_is_not_run_twice(server, sar):
    header = {"id": uuid.uuid4().hex, "task": "click", "points": [[400, 400]], "image": {"modality": "sar"}}
    before = server.broker.answered
    with connect(server) as c:
        first = c.request(header, {"image": sar}).header
        second = c.request(header, {"image": sar}).header  # e.g. a Lazy Pirate retry
    assert first == second and server.broker.answered == before + 1


def test_a_zoomed_click_by_id_needs_the_image_once_per_window(server, reference, sar):
    """A click on a large image is answered on the window around it (``zoom_window``): by id,
    a window not encoded yet is ``image_unknown`` (the client then sends the image); a nearby
    click in the same window goes by id; the answer is ``Predictor.predict``'s."""
    with connect(server) as c:
        key = c.upload(sar, "sar")
        header = {"task": "click", "points": [[346, 323]], "image": {"modality": "sar", "id": key}}
        with pytest.raises(ServerError) as err:
            c.request(dict(header, id=uuid.uuid4().hex), {})
        assert err.value.code == ErrorCode.IMAGE_UNKNOWN and "window" in str(err.value)
        out = c.predict(sar, "sar", "", [(346, 323)], task="click")  # by id, refused, then sent again
        near = c.request(dict(header, id=uuid.uuid4().hex, points=[[340, 330]]), {}).header["result"]
    ref = reference.predict(sar, "sar", "", VisualPrompts([(346, 323)], [], []), task="click").to_json()
    assert_same(out, ref)
    assert near["timings_ms"]["vision_encoder"] == 0.0 and near["masks"][0]["size"] == [800, 800]


def test_many_clients_each_answered_exactly_once(server, sar):
    replies, errors = [], []
    small = np.ascontiguousarray(sar[:256, :256])  # no zoom: every click by id on the uploaded encoding

    def one_client(k: int) -> None:
        with connect(server) as c:
            key = c.upload(small, "sar")  # cached images are each client's own
            for i in range(50):
                rid = f"c{k}-r{i}"
                try:
                    if i % 5:
                        out = c.request({"id": rid, "task": "ping"}).header
                    else:
                        out = c.request({"id": rid, "task": "click", "points": [[10 + i, 20 + k]],
                                         "image": {"modality": "sar", "id": key}}, {}).header
                    replies.append(out["id"])
                except ServerError as exc:  # an evicted image would say image_unknown: not expected here
                    errors.append((rid, exc.code))

    threads = [threading.Thread(target=one_client, args=(k,)) for k in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert len(replies) == 1000 and len(set(replies)) == 1000


# -- security and start-up -----------------------------------------------------------
@pytest.fixture(scope="module")
def cpp_query(tmp_path_factory):
    """The C++ client (CMake), or a skip saying what is missing."""
    import shutil

    if not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))):
        pytest.skip("cmake or a C++ compiler is not installed")
    build = tmp_path_factory.mktemp("cpp")
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(build)], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    if not (build / "egx_query").is_file():
        pytest.skip("libzmq (libzmq3-dev) is not installed: the C++ ZeroMQ client was not built")
    return build / "egx_query"


@pytest.fixture(scope="module")
def sar_pgm(tmp_path_factory, sar):
    import cv2

    path = tmp_path_factory.mktemp("pgm") / "sar.pgm"
    cv2.imwrite(str(path), sar[:, :, 0])
    return path


def test_cpp_client_gets_the_python_clients_answer(server, cpp_query, sar, sar_pgm):
    proc = subprocess.run([str(cpp_query), "--connect", server.opts.bind, "--image", str(sar_pgm), "--modality",
                           "sar", "--text", "Segment the ship.", "--point", "400,400", "--max-new-tokens", "3",
                           "--stream"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    with connect(server) as c:
        ref = c.predict(sar[:, :, 0], "sar", "Segment the ship.", [(400, 400)], generation={"max_new_tokens": 3})
    assert out["text"] == ref["text"] and out["masks"] == ref["masks"] and out["image_id"] == ref["image_id"]
    assert proc.stderr.startswith(ref["text"]) and "mask 0:" in proc.stderr
    bad = subprocess.run([str(cpp_query), "--connect", server.opts.bind, "--image", str(sar_pgm), "--modality",
                          "sar", "--text", "x", "--point", "900,10", "--task", "click"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 3 and "bad_request" in bad.stderr and "outside" in bad.stderr


def test_cpp_client_answers_help_and_names_bad_input(cpp_query, sar_pgm, tmp_path):
    """``--help`` prints the usage (exit 0); a non-number, a trailing letter or an out-of-range
    value for a numeric option, and a PNM header that is not numbers, are named (exit 2),
    before any connection (nothing listens at the address)."""
    for flag in ("--help", "-h"):
        proc = subprocess.run([str(cpp_query), flag], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: egx_query --connect ADDR"), proc.stderr
        assert "--max-new-tokens N" in proc.stdout and not proc.stderr
    base = [str(cpp_query), "--connect", "tcp://127.0.0.1:1", "--image", str(sar_pgm), "--modality", "sar"]
    for option, value, expected in (("--max-new-tokens", "abc", "integer"), ("--max-new-tokens", "8x", "integer"),
                                    ("--retries", "-1", "integer"), ("--retries", "99999999999999999999", "integer"),
                                    ("--timeout", "soon", "number"), ("--timeout", "nan", "number")):
        proc = subprocess.run([*base, option, value], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2, (option, value, proc.stderr)
        assert f"{option} expects an {expected}" in proc.stderr or f"{option} expects a {expected}" in proc.stderr
        assert f"got '{value}'" in proc.stderr and "stoi" not in proc.stderr and "--help" in proc.stderr
    bad_pgm = tmp_path / "bad.pgm"
    bad_pgm.write_bytes(b"P5\nwide 10\n255\n" + bytes(100))
    proc = subprocess.run([*base[:4], str(bad_pgm), *base[5:]], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and f"{bad_pgm}: width expects an integer" in proc.stderr, proc.stderr


def test_curve_serves_listed_clients_only(tiny_build, tmp_path, sar):
    from runtime.security import load_keys, write_keys

    write_keys(tmp_path / "keys", ("server", "alice", "mallory"))
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "alice.key").write_bytes((tmp_path / "keys" / "alice.key").read_bytes())
    server_pub = load_keys(tmp_path / "keys" / "server.key", need_secret=False)[0]
    alice = load_keys(tmp_path / "keys" / "alice.key_secret", need_secret=True)
    mallory = load_keys(tmp_path / "keys" / "mallory.key_secret", need_secret=True)
    with running(tiny_build[0], threads=1, curve_secret=tmp_path / "keys" / "server.key_secret", allow=allow) as s:
        with Client(s.opts.bind, 20, 0, server_pub, alice) as c:
            assert c.predict(sar, "sar", "", [(400, 400)], task="click")["masks"]
        with Client(s.opts.bind, 2, 0, server_pub, mallory) as c, pytest.raises(ServerUnavailable) as err:
            c.ping()
        assert "refusing this client's CURVE key" in str(err.value) and "--allow" in str(err.value)
        with Client(s.opts.bind, 2, 0) as c, pytest.raises(ServerUnavailable):
            c.ping()


def egx(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "egx", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_serve_refuses_unsafe_binds_and_bad_builds(tiny_build, tmp_path):
    import shutil

    proc = egx("serve", "--engines", str(tiny_build[0]), "--bind", "tcp://0.0.0.0:5555")
    assert proc.returncode == 2 and "--insecure" in proc.stderr and "--curve-secret" in proc.stderr
    proc = egx("serve", "--engines", str(tmp_path / "none"))
    assert proc.returncode == 2 and "build engines first" in proc.stderr
    copy = tmp_path / "copy"
    shutil.copytree(tiny_build[0], copy)
    with open(copy / "llm.onnx", "ab") as f:
        f.write(b"\0")
    proc = egx("serve", "--engines", str(copy))
    assert proc.returncode == 2 and "sha256" in proc.stderr and "rebuild" in proc.stderr.lower()


def test_serve_query_and_sigterm_shutdown(tiny_build, tmp_path, sar):
    """egx serve and egx query (streamed, with an overlay); SIGTERM with a request in flight:
    that request is answered or failed explicitly, and the server exits 0."""
    serve = subprocess.Popen([sys.executable, "-m", "egx", "serve", "--engines", str(tiny_build[0]),
                              "--bind", ANY_PORT], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "egx serve:" not in line and serve.poll() is None:  # workers may print warnings first
            line = serve.stderr.readline()
        found = re.search(r" on (tcp://127\.0\.0\.1:\d+),", line)
        assert found, line
        address = found.group(1)
        proc = egx("query", "--connect", address, "--image", SAR, "--modality", "sar", "--text",
                   "Segment the ship.", "--point", "400,400", "--max-new-tokens", "3", "--stream", "--json",
                   "--overlay", str(tmp_path / "overlay.png"))
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["task"] == "segment" and out["masks"][0]["size"] == [800, 800]
        assert out["text"] in proc.stderr  # streamed before the JSON
        import cv2

        assert cv2.imread(str(tmp_path / "overlay.png")).shape == (800, 800, 3)
        outcome = []
        streaming = threading.Event()

        def long_request():
            with Client(address, timeout_s=30, retries=0) as c:
                try:
                    outcome.append(c.predict(sar, "sar", "Describe the image.", task="caption", stream=True,
                                             on_text=lambda _: streaming.set(),
                                             generation={"max_new_tokens": 1024})["text"])
                except ServerError as exc:
                    outcome.append(exc.code)

        t = threading.Thread(target=long_request)
        t.start()
        assert streaming.wait(30)  # the request is running (its first tokens arrived): now stop the server
    finally:
        serve.send_signal(signal.SIGTERM)
        rest = serve.communicate(timeout=60)[1]
    t.join(60)
    assert serve.returncode == 0 and "stopping (1 request(s) in flight)" in rest
    assert len(outcome) == 1 and outcome[0] not in (ErrorCode.WORKER_LOST, ErrorCode.INTERNAL)


def test_protocol_document_matches_the_code(server):
    """docs/protocol.md: its error codes and tasks are the code's, and its raw example runs."""
    import re

    from runtime import protocol

    doc = (REPO / "docs" / "protocol.md").read_text()
    table = set(re.findall(r"^\| `([a-z_]+)` \| ", doc.split("## Error codes")[1].split("## Limits")[0], re.M))
    codes = {v for k, v in vars(protocol.ErrorCode).items() if k.isupper()}
    assert table == codes
    for task in protocol.TASKS:
        assert f"`{task}`" in doc
    assert protocol.PROTOCOL.decode() in doc and str(protocol.MAX_FRAMES) in doc
    example = doc.split("```python")[1].split("```")[0].replace("tcp://127.0.0.1:5555", server.opts.bind)
    proc = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "True [64, 64]", proc.stderr


def test_cpp_client_with_curve(tiny_build, tmp_path, cpp_query, sar_pgm):
    from runtime.security import write_keys

    keys = tmp_path / "keys"
    write_keys(keys, ("server", "board", "stranger"))
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "board.key").write_bytes((keys / "board.key").read_bytes())
    with running(tiny_build[0], threads=1, curve_secret=keys / "server.key_secret", allow=allow) as s:
        def query(client: str) -> subprocess.CompletedProcess:
            return subprocess.run([str(cpp_query), "--connect", s.opts.bind, "--image", str(sar_pgm), "--modality",
                                   "sar", "--text", "", "--point", "400,400", "--task", "click", "--timeout", "2",
                                   "--retries", "0", "--server-key", str(keys / "server.key"), "--client-key",
                                   str(keys / f"{client}.key_secret")], capture_output=True, text=True, timeout=60)

        ok = query("board")
        assert ok.returncode == 0 and json.loads(ok.stdout)["masks"], ok.stderr
        refused = query("stranger")
        assert refused.returncode == 2 and "no reply" in refused.stderr and "CURVE key" in refused.stderr
