"""HTTP load test for a running server, and the batching on/off matrix.

    python -m mimic_engine.server.loadtest run --url http://127.0.0.1:8000 --route search -c 16 -n 400
    python -m mimic_engine.server.loadtest matrix --model ckpt.pt --index DIR     # starts its own servers
    python -m mimic_engine.server.loadtest inproc --model ckpt.pt                 # the batcher alone, no HTTP

`run` keeps `concurrency` clients busy (each sends its next request when the previous one is
answered) until `requests` are done, and reports throughput, p50/p99 latency and status counts.
`matrix` starts `mimic-engine serve` with --batching and --no-batching and runs search and embed
at concurrency 1 and 16 against each, printing one table. Bounded by construction: a fixed number
of requests, a timeout per request.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import click
import numpy as np

WORDS = ("river bridge market night train mountain cat dog bus city garden harbor castle forest museum island "
         "storm winter summer tower painting bicycle lantern orchard violin").split()


def payloads(route: str, n: int, seed: int = 0, image_fraction: float = 0.0) -> list[dict]:
    """Varied request bodies (different lengths; some with a small image)."""
    rng = np.random.default_rng(seed)
    image = _png(rng)
    out = []
    for _ in range(n):
        item = {"text": " ".join(rng.choice(WORDS, size=int(rng.integers(2, 24))))}
        if rng.random() < image_fraction:
            item = {"image": image, "caption": item["text"]}
        out.append({"query": item, "k": 10} if route == "search" else {"items": [item], "role": "query"})
    return out


def _png(rng) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def run_load(url: str, route: str = "search", concurrency: int = 16, requests: int = 400, warmup: int = 20,
             image_fraction: float = 0.0, timeout: float = 60.0) -> dict:
    import httpx

    path = {"search": "/v1/search", "embed": "/v1/embed"}[route]
    bodies = payloads(route, requests + warmup, image_fraction=image_fraction)
    with httpx.Client(base_url=url, timeout=timeout) as client:
        for body in bodies[:warmup]:
            client.post(path, json=body)
    bodies = bodies[warmup:]
    latencies, statuses = [], {}
    lock = threading.Lock()
    next_index = [0]

    def worker():
        with httpx.Client(base_url=url, timeout=timeout) as client:
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= len(bodies):
                    return
                t0 = time.perf_counter()
                try:
                    status = client.post(path, json=bodies[i]).status_code
                except httpx.HTTPError as exc:
                    status = exc.__class__.__name__
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    statuses[status] = statuses.get(status, 0) + 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {"route": route, "concurrency": concurrency, "requests": len(bodies), "seconds": round(wall, 2),
            "req_per_s": round(len(bodies) / wall, 1), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "statuses": statuses}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, index: str, extra: list[str], log_path: str, timeout: float = 300.0):
    """-> (process, url) once /readyz answers."""
    import httpx

    port = _free_port()
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "mimic_engine.cli", "serve", "--model", model, "--index", index,
                             "--port", str(port), "--log-level", "warning", *extra],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError(f"the server did not get ready in {timeout} s; see {log_path}")


def format_rows(rows: list[dict]) -> str:
    head = f"{'batching':>8} {'route':>6} {'conc':>4} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}  statuses"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['batching']:>8} {r['route']:>6} {r['concurrency']:>4} {r['req_per_s']:>7} "
                     f"{r['p50_ms']:>8} {r['p99_ms']:>8}  {json.dumps(r['statuses'])}")
    return "\n".join(lines)


@click.group()
def main():
    """Load-test the HTTP server."""


@main.command("run")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True)
@click.option("--route", type=click.Choice(["search", "embed"]), default="search", show_default=True)
@click.option("-c", "--concurrency", type=click.IntRange(1, 256), default=16, show_default=True)
@click.option("-n", "--requests", type=click.IntRange(1, 100_000), default=400, show_default=True)
@click.option("--image-fraction", type=click.FloatRange(0, 1), default=0.0, show_default=True)
def run_command(url, route, concurrency, requests, image_fraction):
    """Load one running server."""
    click.echo(json.dumps(run_load(url, route, concurrency, requests, image_fraction=image_fraction)))


@main.command("matrix")
@click.option("--model", required=True, type=click.Path(exists=True))
@click.option("--index", required=True, type=click.Path(file_okay=False))
@click.option("--backend", default="torch", show_default=True)
@click.option("-n", "--requests", type=click.IntRange(1, 100_000), default=300, show_default=True)
@click.option("--concurrency", "levels", multiple=True, type=int, default=(1, 16), show_default=True)
@click.option("--image-fraction", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Passed to serve --threads.")
@click.option("--log", "log_path", default="loadtest-server.log", show_default=True)
def matrix_command(model, index, backend, requests, levels, image_fraction, threads, log_path):
    """Batching on vs off x search/embed x concurrency levels, each against a fresh server."""
    rows = []
    extra = ["--backend", backend] + (["--threads", str(threads)] if threads else [])
    for batching in ("--batching", "--no-batching"):
        proc, url = start_server(model, index, [*extra, batching], log_path)
        try:
            for route in ("search", "embed"):
                for c in levels:
                    row = {"batching": "on" if batching == "--batching" else "off",
                           **run_load(url, route, c, requests, image_fraction=image_fraction)}
                    click.echo(json.dumps(row), err=True)
                    rows.append(row)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    click.echo(format_rows(rows))


@main.command("inproc")
@click.option("--model", required=True, type=click.Path(exists=True))
@click.option("--backend", default="torch", show_default=True)
@click.option("-n", "--requests", type=click.IntRange(1, 100_000), default=320, show_default=True)
@click.option("--concurrency", "levels", multiple=True, type=int, default=(1, 16), show_default=True)
def inproc_command(model, backend, requests, levels):
    """The batcher without HTTP: threads send one-item requests straight to the encoder."""
    from ..preprocess import Item
    from ..runtime import load_backend
    from ..runtime.batcher import make_encoder

    be = load_backend(backend, model)
    be.warmup()
    texts = [p["items"][0]["text"] for p in payloads("embed", requests)]
    for batching in (True, False):
        for c in levels:
            encoder = make_encoder(be, batching, max_batch=32, max_wait_ms=5)
            lock, latencies, next_index = threading.Lock(), [], [0]

            def worker():
                while True:
                    with lock:
                        i = next_index[0]
                        next_index[0] += 1
                    if i >= len(texts):
                        return
                    t0 = time.perf_counter()
                    encoder.encode([Item(text=texts[i])], "query")
                    latencies.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=worker) for _ in range(c)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            lat = np.asarray(latencies) * 1000
            click.echo(f"batching {'on ' if batching else 'off'} c={c:<3d} {len(texts) / wall:7.1f} items/s  "
                       f"p50 {np.percentile(lat, 50):6.1f} ms  p99 {np.percentile(lat, 99):6.1f} ms")
            encoder.close()


if __name__ == "__main__":
    main()
