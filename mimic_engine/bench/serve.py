"""`mimic-engine bench serve`: a bounded load generator for a running mimic-engine server.

    mimic-engine bench serve --url http://127.0.0.1:8000 --concurrency 1,16 --requests 200 --route search
    mimic-engine bench serve-matrix --model ckpt.pt --index DIR    # batching on/off x search/embed x 1,16
    mimic-engine bench serve --url A --url B ...   # servers side by side: compare.py

For each concurrency level c, c worker threads (one keep-alive HTTP client each) send requests
until `--requests` have been sent or `--duration` seconds have passed, whichever comes first. Every
request is counted exactly once: by its HTTP status, or as "exception:<Name>" when no answer came
(refused, reset, timed out), so the counts always add up to the number sent. Latency percentiles
are over successful (2xx) requests; QPS is requests sent / wall time of the level.

Only servers on this machine are targeted: any host that is not a loopback address is refused.
Payloads mix realistic text queries with image queries (a handwritten digit from scikit-learn's
scans, PNG, base64), `--image-fraction` of them images.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import urlsplit

import numpy as np

from ..errors import ConfigError, MimicError
from . import log
from .environment import environment
from .inputs import digit_png_base64
from .report import new_report
from .timing import latency_stats

SCHEMA = "mimic-engine-bench-serve/1"
ROUTES = {"search": "/v1/search", "embed": "/v1/embed"}
MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 256
DEFAULT_CONCURRENCY = (1, 16)

TEXT_QUERIES = (
    "what colour is the bus parked outside the museum", "a black cat sitting on a window sill",
    "who designed the stone bridge over the river", "how many towers does the cathedral have",
    "handwritten digit seven", "people walking through a city street at night",
    "what is the tallest building in the old town", "a yellow flower in a summer garden",
    "when was the lighthouse on the north coast built", "two children playing football in the park",
    "which animal is shown on the coat of arms", "snow on the mountains in early winter",
)
IMAGE_QUESTIONS = (None, "which digit is this", "what number is written here")


def check_loopback(url: str) -> str:
    """-> the URL without a trailing slash; refuses non-HTTP URLs and hosts that are not loopback."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url {url!r} is not an http(s) URL with a host; e.g. http://127.0.0.1:8000")
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: it could resolve anywhere
        loopback = False
    if not loopback:
        raise ConfigError(f"--url host {host!r} is not a loopback address: bench serve only loads a server on this "
                          "machine (127.0.0.1, ::1 or localhost); run it on the server's host against "
                          "http://127.0.0.1:PORT")
    return url.rstrip("/")


def make_payloads(route: str, image_fraction: float, seed: int, n: int = 64, k: int = 10) -> list[dict]:
    """n request bodies for `route` ("search" or "embed"), a share `image_fraction` with an image."""
    rng = np.random.default_rng(seed)
    n_img = int(round(image_fraction * n))
    images = iter(digit_png_base64(n_img, seed))
    is_image = np.zeros(n, dtype=bool)
    is_image[rng.choice(n, n_img, replace=False)] = True
    bodies = []
    for i in range(n):
        if is_image[i]:
            question = IMAGE_QUESTIONS[int(rng.integers(len(IMAGE_QUESTIONS)))]
            item = {"image": next(images), **({"text": question} if question else {})}
        else:
            item = {"text": TEXT_QUERIES[int(rng.integers(len(TEXT_QUERIES)))]}
        bodies.append({"query": item, "k": k} if route == "search" else {"items": [item], "role": "query"})
    return bodies


def run_level(url: str, payloads: list[dict], concurrency: int, requests: int, duration_s: float,
              headers: dict, timeout_s: float) -> dict:
    """Send up to `requests` POSTs to `url` from `concurrency` threads within `duration_s` seconds.

    -> {"concurrency", "sent", "ok", "status_counts": {status|"exception:Name": n}, "errors": {...non-2xx...},
        "wall_s", "qps", "ok_qps", "latency_ms": timing.latency_stats of the 2xx answers, or None}
    """
    import httpx

    lock = threading.Lock()
    issued = [0]
    deadline = time.perf_counter() + duration_s
    records: list[list[tuple[str, float]]] = [[] for _ in range(concurrency)]  # per worker: (status, ms)

    def next_index():
        with lock:
            if issued[0] >= requests or time.perf_counter() >= deadline:
                return None
            issued[0] += 1
            return issued[0] - 1

    def worker(slot: int):
        with httpx.Client(timeout=timeout_s, headers=headers) as client:
            while (i := next_index()) is not None:
                t0 = time.perf_counter()
                try:
                    status = str(client.post(url, json=payloads[i % len(payloads)]).status_code)
                except httpx.HTTPError as exc:
                    status = f"exception:{exc.__class__.__name__}"
                records[slot].append((status, (time.perf_counter() - t0) * 1e3))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start

    flat = [r for rec in records for r in rec]
    counts: dict[str, int] = {}
    for status, _ in flat:
        counts[status] = counts.get(status, 0) + 1
    ok_ms = [ms for status, ms in flat if status.startswith("2")]
    return {
        "concurrency": concurrency,
        "sent": len(flat),
        "ok": len(ok_ms),
        "status_counts": dict(sorted(counts.items())),
        "errors": {s: n for s, n in sorted(counts.items()) if not s.startswith("2")},
        "wall_s": wall,
        "qps": len(flat) / wall if wall > 0 else 0.0,
        "ok_qps": len(ok_ms) / wall if wall > 0 else 0.0,
        "latency_ms": latency_stats(ok_ms),
    }


def server_info(base: str, headers: dict) -> dict | None:
    """GET /v1/info (None when the server has no such route); a server that does not answer is an error."""
    import httpx

    try:
        r = httpx.get(base + "/v1/info", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise MimicError(f"no server answers at {base} ({exc.__class__.__name__}: {exc}); start one with "
                         "`mimic-engine serve` and pass its address as --url") from exc
    if r.status_code != 200:
        return None
    try:
        return r.json()
    except ValueError:
        return None


@dataclass
class ServeOptions:
    """`bench serve`: one load test of a running server, with its defaults."""

    url: str
    concurrency: list = field(default_factory=lambda: list(DEFAULT_CONCURRENCY))  # concurrent clients per level
    requests: int = 200  # per level, at most
    duration_s: float = 60.0  # per level, at most
    route: str = "search"
    api_key: str | None = None
    image_fraction: float = 0.3  # share of queries that are PNG digits instead of text
    warmup: int = 5  # unreported requests first
    timeout_s: float = 30.0  # per request
    seed: int = 0


@dataclass
class MatrixOptions:
    """`bench serve-matrix`: batching on vs off, each against a fresh server, with its defaults."""

    model: str
    index: str
    backend: str = "torch"
    threads: int | None = None
    concurrency: list = field(default_factory=lambda: list(DEFAULT_CONCURRENCY))
    requests: int = 300
    duration_s: float = 120.0
    image_fraction: float = ServeOptions.image_fraction
    log_path: str = "bench-serve-matrix.log"  # the servers' output


def run_serve_bench(opts: ServeOptions) -> dict:
    """The whole load test -> the report written by --json: report.new_report's fields plus
    {"url", "route", "path", "image_fraction", "requests_per_level", "duration_limit_s", "warmup_requests",
     "server": GET /v1/info or None, "levels": [run_level(...) per concurrency]}."""
    base = check_loopback(opts.url)
    if opts.route not in ROUTES:
        raise ConfigError(f"route {opts.route!r} is unknown; choose one of {sorted(ROUTES)}")
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    info = server_info(base, headers)
    payloads = make_payloads(opts.route, image_fraction=opts.image_fraction, seed=opts.seed)
    target = base + ROUTES[opts.route]
    if opts.warmup:
        run_level(target, payloads, 1, opts.warmup, opts.duration_s, headers, opts.timeout_s)  # not reported
    levels = []
    for c in opts.concurrency:
        log(f"concurrency {c}: up to {opts.requests} requests or {opts.duration_s:g} s", "bench serve")
        levels.append(run_level(target, payloads, c, opts.requests, opts.duration_s, headers, opts.timeout_s))
    return new_report(SCHEMA, environment("cpu"), url=base, route=opts.route, path=ROUTES[opts.route],
                      image_fraction=opts.image_fraction, requests_per_level=opts.requests,
                      duration_limit_s=opts.duration_s, warmup_requests=opts.warmup, server=info, levels=levels)


# ---- batching on / off, each against a fresh server -------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, index: str, extra: list[str], log_path: str, timeout_s: float = 600.0):
    """Start `mimic-engine serve` on a free loopback port -> (process, url) once /readyz answers 200."""
    import httpx

    port = _free_port()
    log_file = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "mimic_engine.cli", "serve", "--model", model, "--index", index,
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra],
                            stdout=log_file, stderr=subprocess.STDOUT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise MimicError(f"the server exited with status {proc.returncode} before it was ready; see {log_path}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise MimicError(f"the server was not ready within {timeout_s:g} s; see {log_path}")


def stop_server(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def serve_matrix(opts: MatrixOptions) -> Iterator[dict]:
    """For batching on, then off: a fresh server, then search and embed at each concurrency.
    -> yields each `run_serve_bench` report, with "batching": True/False, as soon as it is measured."""
    extra = ["--backend", opts.backend] + (["--threads", str(opts.threads)] if opts.threads else [])
    for batching in (True, False):
        proc, url = start_server(opts.model, opts.index, [*extra, "--batching" if batching else "--no-batching"],
                                 opts.log_path)
        try:
            for route in ("search", "embed"):
                report = run_serve_bench(ServeOptions(url, opts.concurrency, opts.requests, opts.duration_s, route,
                                                      image_fraction=opts.image_fraction))
                report["batching"] = batching
                yield report
        finally:
            stop_server(proc)
