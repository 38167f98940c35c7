"""`mimic-engine bench serve`: a bounded load generator for a running mimic-engine server.

    mimic-engine bench serve --url http://127.0.0.1:8000 --concurrency 1,16 --requests 200 --route search
    mimic-engine bench serve-matrix --model ckpt.pt --index DIR    # batching on/off x search/embed x 1,16

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

import base64
import io
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import click
import numpy as np

from .errors import ConfigError, MimicError

SCHEMA = "mimic-engine-bench-serve/1"
ROUTES = {"search": "/v1/search", "embed": "/v1/embed"}
MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 256

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


def digit_png_base64(n: int, seed: int = 0, size: int = 32) -> list[str]:
    """n PNG images of handwritten digits, base64."""
    from .bench import digit_images

    out = []
    for img in digit_images(n, seed, size):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def make_payloads(route: str, n: int = 64, image_fraction: float = 0.3, seed: int = 0, k: int = 10) -> list[dict]:
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
              headers: dict, timeout_s: float = 30.0) -> dict:
    """Send up to `requests` POSTs to `url` from `concurrency` threads within `duration_s` seconds.

    -> {"concurrency", "sent", "ok", "status_counts": {status|"exception:Name": n}, "errors": {...non-2xx...},
        "wall_s", "qps", "ok_qps", "latency_ms": {"median", "p90", "p99", "mean", "max", "n"} (2xx only) or None}
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
        "latency_ms": _stats(ok_ms),
    }


def _stats(ms: list[float]) -> dict | None:
    if not ms:
        return None
    a = np.asarray(ms)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "max": float(a.max()), "n": int(a.size)}


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


def run_serve_bench(url: str, concurrency: list[int], requests: int, duration_s: float, route: str,
                    api_key: str | None = None, image_fraction: float = 0.3, warmup: int = 5, seed: int = 0,
                    timeout_s: float = 30.0) -> dict:
    """The whole load test -> the report written by --json (schema in `run_level`, per level)."""
    base = check_loopback(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    info = server_info(base, headers)
    payloads = make_payloads(route, image_fraction=image_fraction, seed=seed)
    target = base + ROUTES[route]
    if warmup:
        run_level(target, payloads, 1, warmup, duration_s, headers, timeout_s)  # not reported
    levels = []
    for c in concurrency:
        click.echo(f"[bench serve] concurrency {c}: up to {requests} requests or {duration_s:g} s", err=True)
        levels.append(run_level(target, payloads, c, requests, duration_s, headers, timeout_s))
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "url": base,
            "route": route, "image_fraction": image_fraction, "requests_per_level": requests,
            "duration_limit_s": duration_s, "warmup_requests": warmup, "server": info, "levels": levels}


def format_serve_table(report: dict) -> str:
    header = ("concurrency", "sent", "ok", "errors", "QPS", "median ms", "p90 ms", "p99 ms")
    rows = []
    for lv in report["levels"]:
        lat = lv["latency_ms"] or {}
        errors = ", ".join(f"{s}: {n}" for s, n in lv["errors"].items()) or "-"
        rows.append((str(lv["concurrency"]), str(lv["sent"]), str(lv["ok"]), errors, f"{lv['qps']:.1f}",
                     *(f"{lat[k]:.1f}" if lat else "-" for k in ("median", "p90", "p99"))))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths))
    title = f"POST {report['url']}{ROUTES[report['route']]}  ({report['image_fraction']:.0%} image queries)"
    return "\n".join([title, fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _int_list(ctx, param, value):
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers; e.g. 1,16") from None
    if not out or min(out) < 1 or max(out) > MAX_CONCURRENCY:
        raise click.BadParameter(f"{value!r}: concurrency levels must be integers in [1, {MAX_CONCURRENCY}]")
    return out


@click.command("serve")
@click.option("--url", required=True, help="The running server, e.g. http://127.0.0.1:8000 (loopback only).")
@click.option("--concurrency", default="1,16", show_default=True, callback=_int_list,
              help="Comma-separated numbers of concurrent clients, one level each.")
@click.option("--requests", type=click.IntRange(1, MAX_REQUESTS), default=200, show_default=True,
              help="Requests per level (at most).")
@click.option("--duration", type=click.FloatRange(0.1, 3600), default=60.0, show_default=True,
              help="Seconds per level (at most).")
@click.option("--route", type=click.Choice(sorted(ROUTES)), default="search", show_default=True)
@click.option("--api-key", envvar="MIMIC_API_KEY", default=None, help="Sent as a Bearer token [env MIMIC_API_KEY].")
@click.option("--image-fraction", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Share of queries that are images (PNG digits) instead of text.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Unreported requests first.")
@click.option("--timeout", type=click.FloatRange(0.1, 600), default=30.0, show_default=True, help="Seconds per request.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report here.")
def serve_command(url, concurrency, requests, duration, route, api_key, image_fraction, warmup, timeout, json_path):
    """Load-test a running server: QPS, latency percentiles and errors by status per concurrency level."""
    report = run_serve_bench(url, concurrency, requests, duration, route, api_key, image_fraction, warmup,
                             timeout_s=timeout)
    click.echo(format_serve_table(report))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=2)
        click.echo(f"wrote {json_path}")


# ---- batching on / off, each against a fresh server -------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, index: str, extra: list[str], log_path: str, timeout_s: float = 600.0):
    """Start `mimic-engine serve` on a free loopback port -> (process, url) once /readyz answers 200."""
    import httpx

    port = _free_port()
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "mimic_engine.cli", "serve", "--model", model, "--index", index,
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
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


@click.command("serve-matrix")
@click.option("--model", required=True, type=click.Path(exists=True), help="Checkpoint or export directory to serve.")
@click.option("--index", required=True, type=click.Path(file_okay=False), help="Index folder (built for that model).")
@click.option("--backend", default="torch", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Passed to serve --threads.")
@click.option("--concurrency", default="1,16", show_default=True, callback=_int_list)
@click.option("--requests", type=click.IntRange(1, MAX_REQUESTS), default=300, show_default=True)
@click.option("--duration", type=click.FloatRange(0.1, 3600), default=120.0, show_default=True)
@click.option("--image-fraction", type=click.FloatRange(0, 1), default=0.3, show_default=True)
@click.option("--log", "log_path", default="bench-serve-matrix.log", show_default=True, help="The servers' output.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write all reports here.")
def serve_matrix_command(model, index, backend, threads, concurrency, requests, duration, image_fraction, log_path,
                         json_path):
    """Dynamic batching on vs off: for each mode a fresh server, then search and embed at each concurrency."""
    extra = ["--backend", backend] + (["--threads", str(threads)] if threads else [])
    reports = []
    for mode in ("--batching", "--no-batching"):
        proc, url = start_server(model, index, [*extra, mode], log_path)
        try:
            for route in ("search", "embed"):
                report = run_serve_bench(url, concurrency, requests, duration, route, image_fraction=image_fraction)
                report["batching"] = mode == "--batching"
                click.echo(f"batching {'on' if report['batching'] else 'off'}: " + format_serve_table(report))
                reports.append(report)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(reports, fh, indent=2)
        click.echo(f"wrote {json_path}")
