"""`mimic-engine bench` (model benchmark), `bench serve` (load generator) and `bench index`; the
package's import rules.

Tiny preset, few iterations, one thread: these check what is reported and how, never speed.
"""
from __future__ import annotations

import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from click.testing import CliRunner

from mimic_engine.cli import cli

FAST = ["--preset", "tiny", "--iters", "2", "--warmup", "1", "--batches", "1,2", "--threads", "1"]
RESULT_KEYS = {"backend", "batch", "latency_ms", "device_ms", "items_per_s", "speedup", "parity", "samples_ms"}
LATENCY_KEYS = {"median", "p90", "p99", "mean", "min", "max", "n"}


def run_cli(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def exporter_available() -> bool:
    try:
        from mimic_engine.export.pipeline import export_checkpoint  # noqa: F401
    except ImportError:
        return False
    return True


def check_report(report: dict, backends: list[str], batches: list[int], iters: int) -> None:
    """The documented schema (run_bench's docstring), and the baseline's defining values."""
    assert report["schema"] == "mimic-engine-bench/1"
    for key in ("created", "model", "inputs", "settings", "environment", "preprocess_ms", "backends", "results", "recall"):
        assert key in report, key
    assert report["settings"]["batches"] == batches
    assert report["settings"]["baseline"] == "torch"
    env = report["environment"]
    assert env["versions"]["torch"] and env["torch_threads"] >= 1 and env["cpu_count"] >= 1
    assert env["cpu"] and isinstance(env["cpu_flags"], list)
    assert set(report["preprocess_ms"]) == {str(b) for b in batches}
    assert [(r["backend"], r["batch"]) for r in report["results"]] == [(n, b) for b in batches for n in backends]
    for r in report["results"]:
        assert set(r) == RESULT_KEYS
        lat = r["latency_ms"]
        assert set(lat) == LATENCY_KEYS and lat["n"] == iters == len(r["samples_ms"])
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert r["items_per_s"] == pytest.approx(r["batch"] / (lat["median"] / 1e3))
        base = next(x for x in report["results"] if x["backend"] == "torch" and x["batch"] == r["batch"])
        assert r["speedup"] == pytest.approx(base["latency_ms"]["median"] / lat["median"])
        if r["backend"] == "torch":
            assert r["speedup"] == 1.0
            assert abs(r["parity"]["min_cosine"] - 1.0) < 1e-9  # CPU eager fp32 is deterministic
            assert r["parity"]["max_abs_diff"] == 0.0
        assert report["backends"][r["backend"]]["status"] == "ok"


def check_png(path) -> None:
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 800 and img.size[1] > 400


# ---- model benchmark ------------------------------------------------------------------------------
def test_bench_torch_end_to_end(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = run_cli(["bench", *FAST, "--backends", "torch", "--no-peak-memory", "--json", str(out),
                      "--plot", str(png)])
    report = json.loads(out.read_text())
    check_report(report, ["torch"], [1, 2], iters=2)
    assert report["model"]["preset"] == "tiny" and report["model"]["random_weights"] is True
    assert report["model"]["params"] > 0 and report["model"]["embed_dim"] == 16
    assert report["inputs"]["text_tokens"] == 32  # the tiny preset's max_length, the default
    assert report["inputs"]["visual_tokens_per_image"] == 16
    check_png(png)
    for word in ("median ms", "speedup", "min cos", "torch"):
        assert word in result.output


def test_bench_onnx_end_to_end(tmp_path):
    if not exporter_available():
        pytest.skip("the ONNX exporter (mimic_engine.export.pipeline.export_checkpoint) is not in this installation")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    run_cli(["bench", *FAST, "--backends", "torch,onnx", "--no-peak-memory", "--json", str(out), "--plot", str(png)])
    report = json.loads(out.read_text())
    check_report(report, ["torch", "onnx"], [1, 2], iters=2)
    for r in report["results"]:
        assert r["parity"]["min_cosine"] > 0.9999, r  # fp32 ONNX Runtime matches eager fp32
    check_png(png)


def test_unavailable_backend_is_reported_not_fatal(tmp_path):
    out = tmp_path / "bench.json"
    # torch-cuda needs a CUDA GPU; on a CPU run it must be listed with its reason, and the rest still runs
    result = run_cli(["bench", *FAST, "--batches", "2", "--device", "cpu", "--backends", "torch,torch-cuda",
                      "--no-peak-memory", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["backends"]["torch-cuda"]["status"] == "skipped"
    assert "cuda" in report["backends"]["torch-cuda"]["reason"].lower()
    assert [r["backend"] for r in report["results"]] == ["torch"]
    assert "not run:" in result.output


def test_unknown_backend_and_bad_lengths_are_refused():
    runner = CliRunner()
    result = runner.invoke(cli, ["bench", *FAST, "--backends", "torch,onnx-fast"])
    assert result.exit_code != 0 and "onnx-fast" in str(result.exception or result.output)
    result = runner.invoke(cli, ["bench", *FAST, "--backends", "torch", "--text-len", "999", "--no-peak-memory"])
    assert result.exit_code != 0 and "max_length" in str(result.exception or result.output)
    result = runner.invoke(cli, ["bench", "--batch", "4", "--batches", "1,2"])
    assert result.exit_code != 0 and "not both" in result.output


def test_bench_items_token_count_images_and_mix(tiny_encoders):
    from mimic_engine.bench.inputs import InputSpec, bench_items

    pre = tiny_encoders("decoder").preprocessor
    items = bench_items(pre, 8, InputSpec(text_tokens=12, images_per_item=2, text_only_fraction=0.5, seed=3))
    batch = pre.collate(items)
    assert batch.input_ids.shape == (8, 12) and int(batch.attention_mask.sum()) == 8 * 12
    assert sorted(batch.image_counts.tolist()) == [0, 0, 0, 0, 2, 2, 2, 2]
    again = bench_items(pre, 8, InputSpec(text_tokens=12, images_per_item=2, text_only_fraction=0.5, seed=3))
    assert [i.text for i in again] == [i.text for i in items]  # deterministic: a memory probe rebuilds them
    text_only = pre.collate(bench_items(pre, 3, InputSpec(images_per_item=0)))
    assert text_only.pixel_values.shape[0] == 0 and text_only.input_ids.shape[1] == pre.max_length


def test_without_pillow_images_are_random_pixel_tensors(tmp_path, tiny_encoders, monkeypatch):
    """A bare GPU machine has no Pillow: the benchmark then feeds random pixels of the same shapes."""
    from mimic_engine.bench import inputs
    from mimic_engine.bench.inputs import InputSpec, bench_items, synthetic_batch

    pre = tiny_encoders("decoder").preprocessor
    spec = InputSpec(text_tokens=12, images_per_item=2, text_only_fraction=0.5, seed=3)
    real, synthetic = pre.collate(bench_items(pre, 8, spec)), synthetic_batch(pre, 8, spec)
    assert synthetic.pixel_values.shape == real.pixel_values.shape
    assert synthetic.image_counts.tolist() == real.image_counts.tolist()
    assert synthetic.input_ids.equal(real.input_ids) and synthetic.attention_mask.equal(real.attention_mask)

    monkeypatch.setattr(inputs, "decoded_images_available", lambda: False)
    out = tmp_path / "bench.json"
    result = run_cli(["bench", *FAST, "--batches", "2", "--backends", "torch", "--no-peak-memory", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["preprocess_ms"] == {"2": None} and report["results"][0]["parity"]["min_cosine"] > 0.9999
    rows = [line for line in result.output.splitlines() if line.startswith("torch ")]
    assert rows and rows[0].rstrip().endswith(" -")  # no preprocessing time in the table


def test_text_only_batches_run(tmp_path):
    """--images-per-item 0 times batches that really hold no image, and their vectors are not those of
    the same texts with images (the count comes from the collated batch, not from the option)."""
    reports = {}
    for images in ("0", "1"):
        out = tmp_path / f"bench-{images}.json"
        run_cli(["bench", *FAST, "--batches", "2", "--backends", "torch", "--images-per-item", images,
                 "--no-peak-memory", "--json", str(out)])
        reports[images] = json.loads(out.read_text())
    text_only, with_images = reports["0"], reports["1"]
    assert text_only["inputs"]["images_per_batch"] == {"2": 0}
    assert with_images["inputs"]["images_per_batch"] == {"2": 2}
    check_report(text_only, ["torch"], [2], iters=2)
    (row,) = text_only["results"]
    assert row["latency_ms"]["n"] == 2 and row["items_per_s"] > 0


def test_parity_and_stats_helpers():
    from mimic_engine.bench.timing import latency_stats, parity

    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 8)).astype(np.float32)
    b = a.copy()
    b[2] = -b[2]  # one item pointing the other way
    p = parity(b, a)
    assert p["min_cosine"] == pytest.approx(-1.0) and p["max_abs_diff"] > 0
    s = latency_stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median"] == 3.0 and s["min"] == 1.0 and s["n"] == 5 and s["p90"] < s["p99"] <= s["max"] == 100.0
    assert latency_stats([]) is None


@pytest.mark.slow
def test_peak_memory_probe_runs_in_a_fresh_process(tmp_path, tiny_encoders):
    from mimic_engine.bench.inputs import InputSpec
    from mimic_engine.bench.memory import measure_memory
    from mimic_engine.checkpoint import save_checkpoint

    enc = tiny_encoders("decoder")
    ckpt = save_checkpoint(str(tmp_path / "ckpt.pt"), enc.model, enc.tokenizer)
    mem = measure_memory("torch", ckpt, "cpu", 2, InputSpec(), threads=1)
    assert "error" not in mem, mem
    assert mem["peak_rss_mb"] >= mem["rss_before_load_mb"] > 0
    assert mem["peak_rss_added_mb"] == pytest.approx(mem["peak_rss_mb"] - mem["rss_before_load_mb"], abs=0.11)
    bad = measure_memory("torch", str(tmp_path / "missing.pt"), "cpu", 2, InputSpec(), threads=1)
    assert "error" in bad and "missing.pt" in bad["error"]


def test_recall_cost_against_the_baseline(tmp_path, tiny_encoders):
    import torch

    from mimic_engine.bench.recall import recall_cost
    from mimic_engine.runtime.torch_backend import TorchBackend

    enc = tiny_encoders("decoder")

    class Perturbed(TorchBackend):  # a backend that loses precision: its top-10 must differ somewhat
        def run_fusion(self, *args):
            out = super().run_fusion(*args)
            return out + 0.05 * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))

    backends = {"torch": TorchBackend.from_encoder(enc), "noisy": Perturbed.from_encoder(enc)}
    rc = recall_cost(backends, "torch", "demo", str(tmp_path / "demo"), "dev", max_queries=20)
    assert rc["n_queries"] == 20 and rc["n_documents"] > 100
    base, noisy = rc["per_backend"]["torch"], rc["per_backend"]["noisy"]
    assert base["overlap_at_10"] == 100.0 and base["delta_recall_at_10"] == 0.0 and base["delta_mrr_at_10"] == 0.0
    assert 0.0 <= noisy["overlap_at_10"] < 100.0
    for v in (base, noisy):
        assert 0.0 <= v["recall_at_10"] <= 100.0 and 0.0 <= v["mrr_at_10"] <= 100.0


# ---- bench serve ----------------------------------------------------------------------------------
class JsonStandIn(BaseHTTPRequestHandler):
    """A loopback HTTP server's handler that answers JSON bodies; GET is 404."""

    def answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def serve_in_thread(handler):
    """-> (the server, its base URL): `handler` on a free loopback port, served by a daemon thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class StandIn(JsonStandIn):
    """A minimal server: /v1/search answers 200, except every 4th request (503) and a wrong key (401)."""

    lock = threading.Lock()
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.seen.append(body)
            n = len(self.seen)
        if self.headers.get("Authorization") != "Bearer sesame":
            status = 401
        elif self.path != "/v1/search":
            status = 404
        else:
            status = 503 if n % 4 == 0 else 200
        payload = json.dumps({"results": []} if status == 200 else {"error": {"code": str(status)}}).encode()
        self.answer(status, payload)


@pytest.fixture
def stand_in_server():
    StandIn.seen = []
    server, url = serve_in_thread(StandIn)
    yield url
    server.shutdown()
    server.server_close()


def test_serve_counts_add_up(stand_in_server, tmp_path):
    out = tmp_path / "serve.json"
    result = run_cli(["bench", "serve", "--url", stand_in_server, "--concurrency", "1,3", "--requests", "20",
                      "--warmup", "0", "--api-key", "sesame", "--image-fraction", "0.5", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["schema"] == "mimic-engine-bench-serve/1" and report["route"] == "search"
    assert report["path"] == "/v1/search" and report["environment"]["versions"]["mimic-engine"]
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 3]
    for lv in report["levels"]:
        assert lv["sent"] == 20 == sum(lv["status_counts"].values())
        assert lv["ok"] + sum(lv["errors"].values()) == lv["sent"]
        assert lv["ok"] == lv["status_counts"]["200"] == lv["latency_ms"]["n"]
        assert set(lv["errors"]) == {"503"}
    assert sum(lv["errors"]["503"] for lv in report["levels"]) == 40 // 4  # the server's every 4th request
    assert len(StandIn.seen) == 40
    images = [b["query"]["image"] for b in StandIn.seen if "image" in b["query"]]
    texts = [b["query"]["text"] for b in StandIn.seen if "image" not in b["query"]]
    assert images and texts and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "QPS" in result.output and "503: " in result.output


def test_serve_counts_errors_by_status(stand_in_server):
    from mimic_engine.bench.serve import ServeOptions, run_serve_bench

    report = run_serve_bench(ServeOptions(stand_in_server, [2], requests=6, duration_s=30, route="search",
                                          api_key="wrong", warmup=0))
    (lv,) = report["levels"]
    assert lv["sent"] == 6 and lv["ok"] == 0 and lv["errors"] == {"401": 6} and lv["latency_ms"] is None


def test_serve_connection_errors_are_counted(stand_in_server):
    from mimic_engine.bench.serve import run_level

    # a closed port: every request fails without an answer, and each is counted once
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lv = run_level(f"http://127.0.0.1:{port}/v1/search", [{"query": {"text": "x"}}], 2, 5, 30, {}, timeout_s=5)
    assert lv["sent"] == 5 and lv["ok"] == 0 and list(lv["errors"]) == ["exception:ConnectError"]


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000", "http://example.com:8000", "http://192.168.0.5",
                                 "ftp://127.0.0.1:21", "127.0.0.1:8000"])
def test_serve_refuses_non_loopback(url):
    from mimic_engine.bench.serve import check_loopback
    from mimic_engine.errors import ConfigError

    with pytest.raises(ConfigError, match="loopback|http"):
        check_loopback(url)
    result = CliRunner().invoke(cli, ["bench", "serve", "--url", url, "--requests", "1"])
    assert result.exit_code != 0


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/", "http://localhost:1", "http://[::1]:9000", "http://127.0.0.9"])
def test_serve_accepts_loopback(url):
    from mimic_engine.bench.serve import check_loopback

    assert check_loopback(url) == url.rstrip("/")


def test_serve_against_the_real_server(tmp_path, tiny_encoders):
    try:
        import uvicorn

        from mimic_engine.index.document_index import DocumentIndex
        from mimic_engine.runtime.torch_backend import TorchBackend
        from mimic_engine.server.app import create_app
        from mimic_engine.server.settings import ServerSettings
    except ImportError as exc:
        pytest.skip(f"the HTTP server is not available here: {exc}")
    from mimic_engine.bench.serve import ServeOptions, run_serve_bench

    enc = tiny_encoders("decoder")
    backend = TorchBackend.from_encoder(enc)
    index = DocumentIndex(str(tmp_path / "index"), backend.dim, backend.model_id)
    app = create_app(ServerSettings(max_wait_ms=1.0), backend, index)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            threading.Event().wait(0.05)
        assert server.started, "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        for route in ("embed", "search"):
            report = run_serve_bench(ServeOptions(f"http://127.0.0.1:{port}", [1, 4], requests=12, duration_s=60,
                                                  route=route, warmup=1))
            for lv in report["levels"]:
                assert lv["sent"] == 12 == lv["ok"] + sum(lv["errors"].values())
                assert lv["ok"] == 12, lv  # a healthy server answers every request
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# ---- bench serve: servers side by side ------------------------------------------------------------
class EmbeddingStandIn(JsonStandIn):
    """Answers this project's /v1/embed and OpenAI's /embeddings with one 4-d vector per text, and
    /v1/embed-broken with one vector too few; keeps every body it was sent, by path."""

    lock = threading.Lock()
    seen: dict = {}
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.seen.setdefault(self.path, []).append(body)
        if self.path.startswith("/v1/embed"):
            n = len(body["items"]) - (self.path == "/v1/embed-broken")
            payload = {"embeddings": [[0.5] * 4] * n, "dim": 4, "truncated": [False] * n, "model_id": "stand-in"}
        else:
            payload = {"object": "list", "data": [{"embedding": [0.5] * 4, "index": i} for i in range(len(body["input"]))],
                       "model": body["model"]}
        self.answer(200, json.dumps(payload).encode())


@pytest.fixture
def embedding_stand_in():
    EmbeddingStandIn.seen = {}
    server, url = serve_in_thread(EmbeddingStandIn)
    yield url
    server.shutdown()
    server.server_close()


def test_compare_targets_and_cells_are_parsed():
    from mimic_engine.bench.compare import parse_cells, parse_target
    from mimic_engine.errors import ConfigError

    ours = parse_target("http://127.0.0.1:8000")
    assert (ours.url, ours.protocol, ours.label) == ("http://127.0.0.1:8000/v1/embed", "mimic", "mimic-engine")
    assert ours.body(["a"]) == {"items": [{"text": "a"}], "role": "query"}
    other = parse_target("http://127.0.0.1:7997/embeddings, model=minilm ,label=infinity,pid=42")
    assert (other.url, other.protocol, other.model, other.label, other.pid) == (
        "http://127.0.0.1:7997/embeddings", "openai", "minilm", "infinity", 42)
    assert other.body(["a", "b"]) == {"input": ["a", "b"], "model": "minilm"}
    for bad, says in (("http://127.0.0.1:7997/v1/embeddings", "model=NAME"), ("http://127.0.0.1:1,colour=red", "colour"),
                      ("http://10.0.0.1:8000", "loopback"), ("http://127.0.0.1:1,pid=abc", "pid")):
        with pytest.raises(ConfigError, match=says):
            parse_target(bad)
    assert parse_cells("1x1, 16x1,4x32") == [(1, 1), (16, 1), (4, 32)]
    for bad in ("16", "0x1", "1x0", "4x32x2", ""):
        with pytest.raises(ConfigError, match="CxK|no cell"):
            parse_cells(bad)


def test_compare_schedule_interleaves_and_rotates():
    from mimic_engine.bench.compare import schedule

    assert schedule(2, [(1, 1), (16, 1)], 2) == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1),
                                                 (1, 0, 1), (1, 0, 0), (1, 1, 1), (1, 1, 0)]


def test_english_queries_are_deterministic_and_bounded():
    from mimic_engine.bench.compare import english_queries

    queries = english_queries(300, seed=3)
    assert queries == english_queries(300, seed=3) != english_queries(300, seed=4)
    lengths = [len(q.split()) for q in queries]
    assert min(lengths) == 5 and max(lengths) == 20 and len(set(queries)) > 250


def test_server_process_and_cpu_are_found():
    import os
    import socket

    from mimic_engine.bench.compare import cpu_seconds, listening_pid

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert listening_pid(s.getsockname()[1]) == os.getpid()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]  # bound, not listening
    assert listening_pid(free) is None
    assert cpu_seconds(os.getpid()) > 0 and cpu_seconds(2**22 + 12345) is None


def test_stage_metrics_are_differenced_per_request():
    from mimic_engine.bench.compare import parse_stage_metrics, stage_ms_per_request

    def text(model_sum, n):
        return (f'mimic_request_stage_seconds_sum{{stage="model"}} {model_sum}\n'
                f'mimic_request_stage_seconds_count{{stage="model"}} {n}\n'
                'mimic_request_stage_seconds_count{stage="queue"} 3.0\n')

    before, after = parse_stage_metrics(text(0.5, 10.0)), parse_stage_metrics(text(1.5, 60.0))
    assert before["model"] == {"sum": 0.5, "count": 10.0}
    assert stage_ms_per_request(before, after) == pytest.approx({"model": 20.0})  # 1 s over 50 requests


def test_compare_runs_both_protocols_on_the_same_texts(embedding_stand_in, tmp_path):
    pytest.importorskip("aiohttp", reason="the side-by-side load generator uses aiohttp")
    out, chart = tmp_path / "compare.json", tmp_path / "compare.png"
    result = run_cli(["bench", "serve", "--url", embedding_stand_in,
                      "--url", f"{embedding_stand_in}/embeddings,model=m1,label=other", "--cells", "1x1,2x3",
                      "--repeats", "2", "--requests", "5", "--texts", "40", "--warmup", "2", "--json", str(out),
                      "--plot", str(chart)])
    report = json.loads(out.read_text())
    assert report["schema"] == "mimic-engine-bench-serve-compare/1" and report["cells"] == [[1, 1], [2, 3]]
    assert [t["label"] for t in report["targets"]] == ["mimic-engine", "other"]
    assert [t["pid"] for t in report["targets"]] == [os.getpid()] * 2  # the stand-in listens in this process
    order = [(r["repeat"], r["concurrency"], r["target"]) for r in report["runs"]]
    assert order == [(0, 1, "mimic-engine"), (0, 1, "other"), (0, 2, "mimic-engine"), (0, 2, "other"),
                     (1, 1, "other"), (1, 1, "mimic-engine"), (1, 2, "other"), (1, 2, "mimic-engine")]
    for r in report["runs"]:
        assert r["sent"] == r["ok"] == 5 and r["errors"] == {} and r["latency_ms"]["n"] == 5
        assert r["texts_per_s"] == pytest.approx(r["qps"] * r["texts_per_request"])
        assert r["server_cpu_cores"] is not None and r["server_stage_ms"] is None  # the stand-in has no /metrics
    # the same requests of texts reached both servers (in another order: the targets alternate)
    ours = [tuple(i["text"] for i in b["items"]) for b in EmbeddingStandIn.seen["/v1/embed"]]
    theirs = [tuple(b["input"]) for b in EmbeddingStandIn.seen["/embeddings"]]
    assert sorted(ours) == sorted(theirs) and len(ours) == 1 + 2 * 2 + 4 * 5  # check, warm-up per request size, runs
    assert sorted(len(t) for t in ours) == [1] * 12 + [2] + [3] * 12
    assert all(b["model"] == "m1" for b in EmbeddingStandIn.seen["/embeddings"])
    summary = {(c["concurrency"], c["texts_per_request"]): c["targets"] for c in report["summary"]}
    assert summary[(1, 1)]["mimic-engine"]["qps_vs_first"] == 1.0 and summary[(2, 3)]["other"]["repeats"] == 2
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 2x3 | other | 2 |" in result.output and "ratios to mimic-engine" in result.output


def test_compare_refuses_a_server_with_wrong_answers(embedding_stand_in):
    pytest.importorskip("aiohttp", reason="the side-by-side load generator uses aiohttp")
    from mimic_engine.bench.compare import CompareOptions, Target, run_compare
    from mimic_engine.errors import MimicError

    broken = Target(f"{embedding_stand_in}/v1/embed-broken", "mimic", "broken")
    with pytest.raises(MimicError, match="2 texts sent, 1 embeddings came back"):
        run_compare(CompareOptions([broken], [(1, 1)], repeats=1, requests=1, warmup=0))


# ---- bench index ----------------------------------------------------------------------------------
def test_bench_index_builds_times_and_probes_a_fresh_process(tmp_path):
    pytest.importorskip("hnswlib", reason="the index needs hnswlib")
    from mimic_engine.index.document_index import DocumentIndex

    folder, out = tmp_path / "index", tmp_path / "index.json"
    run_cli(["bench", "index", "--n", "300", "--dim", "8", "--queries", "20", "--single", "5", "--index", str(folder),
             "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["schema"] == "mimic-engine-bench-index/1" and report["environment"]["cpu_count"] >= 1
    assert (report["n"], report["dim"], report["k"]) == (300, 8, 10)
    for key in ("bulk_upsert_docs_per_s", "single_upsert_docs_per_s", "single_upsert_p50_ms", "search_p50_ms",
                "search_image_only_p50_ms", "folder_mib", "open_s", "search_qps", "raw_hnswlib_search_p50_ms",
                "folder_overhead_p50"):
        assert report[key] > 0, key
    assert report["search_p50_ms"] <= report["search_p99_ms"] and report["backend"] == "folder"
    # 300 documents at ef=128: the graph search is all but exact, filtered or not, and so is raw hnswlib
    for key in ("search_recall_at_k", "search_image_only_recall_at_k", "raw_hnswlib_search_recall_at_k"):
        assert report[key] >= 0.95, (key, report[key])
    # the probe is another process: its resident set grew while it opened and searched the index
    assert report["rss_mib"] > report["rss_before_open_mib"] > 0
    with DocumentIndex(str(folder), dim=8, model_id="bench-random") as idx:
        assert idx.count() == 305 and idx.count("image") == 102  # 300 bulk + 5 single; every third is an image
    result = CliRunner().invoke(cli, ["bench", "index", "--n", "10", "--index", str(folder)])
    assert result.exit_code != 0 and "not empty" in str(result.exception or result.output)


def test_bench_index_on_milvus_lite(tmp_path):
    pytest.importorskip("milvus_lite", reason="milvus-lite is not installed: pip install 'mimic-engine[milvus]'")
    db, out = tmp_path / "bench.db", tmp_path / "index.json"
    run_cli(["bench", "index", "--n", "200", "--dim", "8", "--queries", "10", "--single", "3", "--index", f"milvus:{db}",
             "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["backend"] == "milvus" and report["flush_s"] >= 0 and report["folder_mib"] > 0
    assert report["search_recall_at_k"] >= 0.95 and report["search_image_only_recall_at_k"] >= 0.95
    assert "raw_hnswlib_search_p50_ms" not in report and "rss_mib" not in report  # folder-only measurements
    result = CliRunner().invoke(cli, ["bench", "index", "--n", "10", "--index", f"milvus:{db}"])
    assert result.exit_code != 0 and "exists" in str(result.exception or result.output)


# ---- the command line and the package's imports ---------------------------------------------------
def test_bench_help_lists_every_subcommand():
    out = run_cli(["bench", "--help"]).output
    commands = out[out.index("Commands:"):].split()
    assert {"serve", "serve-matrix", "index", "gpu"} <= set(commands), out
    assert "[default: 1,8,64]" in " ".join(out.split())  # defaults come from BenchOptions through show_default
    assert "bench" not in run_cli(["index", "--help"]).output.split("Commands:")[1]  # moved here


def _imports(path) -> set[str]:
    """Absolute names of every module `path` imports (module level and inside functions)."""
    import ast

    package = "mimic_engine." + path.parent.name if path.parent.name != "mimic_engine" else "mimic_engine"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)  # `from . import x` imports module x
    return names


def test_bench_modules_import_no_circle_and_only_cli_imports_click():
    from pathlib import Path

    import mimic_engine.bench as bench

    folder = Path(bench.__file__).parent
    modules = {f"mimic_engine.bench.{p.stem}": _imports(p) for p in folder.glob("*.py") if p.stem != "__init__"}
    assert {"mimic_engine.bench.model", "mimic_engine.bench.serve", "mimic_engine.bench.gpu"} <= set(modules)
    graph = {m: {n for n in deps if n in modules and n != m} for m, deps in modules.items()}
    done, on_path = set(), []

    def visit(m):  # depth-first: a module met again on the current path closes a circle
        assert m not in on_path, f"import circle: {' -> '.join(on_path[on_path.index(m):] + [m])}"
        if m in done:
            return
        on_path.append(m)
        for n in graph[m]:
            visit(n)
        on_path.pop()
        done.add(m)

    for m in graph:
        visit(m)
    assert [m for m, deps in modules.items() if "click" in deps] == ["mimic_engine.bench.cli"]


def test_kernels_import_neither_the_bench_nor_the_runtime():
    from pathlib import Path

    import mimic_engine.kernels as kernels

    for path in Path(kernels.__file__).parent.glob("*.py"):
        # kernels/ installs as mimic_engine.kernels, so `..runtime` there is mimic_engine.runtime
        bad = {n for n in _imports(path) if n.startswith(("mimic_engine.bench", "mimic_engine.runtime"))}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_importing_the_benchmarks_imports_neither_click_nor_torch():
    import subprocess
    import sys

    code = ("import sys; import mimic_engine.bench.model, mimic_engine.bench.serve, mimic_engine.bench.index, "
            "mimic_engine.bench.gpu, mimic_engine.bench.memory, mimic_engine.bench.recall; "
            "print(sorted(m for m in ('click', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
