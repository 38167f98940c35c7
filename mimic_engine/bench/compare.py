"""`mimic-engine bench serve --url A --url B ...`: embedding servers side by side, one load generator.

    mimic-engine bench serve --url http://127.0.0.1:8000 \
        --url "http://127.0.0.1:7997/embeddings,model=all-MiniLM-L6-v2,label=infinity" \
        --cells 1x1,16x1,4x32 --repeats 2 --json serve-compare.json --plot serve-compare.png

A target is `URL[,model=NAME][,label=NAME][,pid=N]`. Its protocol comes from the URL's path: none
or `/v1/embed` is this project's API ({"items": [{"text"}], "role": "query"}); any other path
(`/v1/embeddings`, `/embeddings`) is OpenAI's ({"input": [texts], "model": NAME}).

A cell is `CxK`: C concurrent clients, K texts per request. Every target gets the same texts in the
same order: `english_queries` (5-20 words each) cut into requests of K. The schedule interleaves,
so slow drifts of a shared machine hit every target alike: each target is warmed up first (and its
answers checked: status, one vector per text), then for each repeat and each cell every target runs
once, the order of the targets rotating by one per repeat. A run ends after `requests` requests or
`duration_s` seconds.

Per run: requests/s, texts/s, latency percentiles of the 2xx answers, the errors by status, and,
where the server's process is found (the process listening on the URL's port, or `pid=`), its CPU
time over the run (cores busy, CPU ms per request). A mimic-engine server also reports its own
per-stage time (`mimic_request_stage_seconds` in /metrics): model ms per request next to CPU ms.
The load generator is one asyncio loop (aiohttp) in this process, the same for every target.
"""
from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

from ..errors import ConfigError, MimicError
from . import log
from .environment import environment
from .report import new_report
from .serve import MAX_CONCURRENCY, check_loopback
from .timing import latency_stats

SCHEMA = "mimic-engine-bench-serve-compare/1"
MIMIC_PATHS = ("", "/v1/embed")
MAX_TEXTS_PER_REQUEST = 1024
DEFAULT_CELLS = ((1, 1), (16, 1), (4, 32))
QUERY_WORDS = (5, 20)  # words per benchmark query, at least and at most
AIOHTTP_MISSING = 'the side-by-side benchmark needs aiohttp: pip install "mimic-engine[bench]" (or: pip install aiohttp)'

# Words of everyday English queries; `english_queries` strings them into questions and descriptions.
SUBJECTS = ("the old bridge", "a red bus", "the city museum", "a black cat", "two children", "the river",
            "a small boat", "the main square", "the train station", "a yellow flower", "the castle", "an old church",
            "the harbour", "a mountain village", "the public library", "a street market", "the lighthouse",
            "a wooden house", "the football stadium", "a busy road", "the town hall", "a snowy forest")
VERBS = ("built", "painted", "opened", "visited", "photographed", "designed", "repaired", "moved", "named", "sold")
DETAILS = ("in the nineteenth century", "near the north coast", "during the summer festival", "at night",
           "after the great fire", "by a local artist", "in early winter", "next to the park", "for the first time",
           "on a rainy morning", "with stone walls", "under a blue sky", "in the old town", "across the valley",
           "before the war", "by the university", "along the main street", "on the other side of the lake")
OPENERS = ("when was", "who", "why was", "how often is", "where was", "what is the story of", "show me",
           "a photo of", "which year was", "how many people")


def english_queries(n: int, seed: int = 0, min_words: int = 5, max_words: int = 20) -> list[str]:
    """n deterministic English queries of `min_words` to `max_words` words (a question or a description
    built from everyday phrases, cut or extended to a random length in that range)."""
    if not 1 <= min_words <= max_words:
        raise ConfigError(f"min_words={min_words}, max_words={max_words}: expected 1 <= min_words <= max_words")
    rng = np.random.default_rng(seed)
    pick = lambda options: options[int(rng.integers(len(options)))]
    out = []
    for _ in range(n):
        target = int(rng.integers(min_words, max_words + 1))
        words = f"{pick(OPENERS)} {pick(SUBJECTS)} {pick(VERBS)} {pick(DETAILS)}".split()
        while len(words) < target:
            words += f"and {pick(SUBJECTS)} {pick(DETAILS)}".split()
        out.append(" ".join(words[:target]))
    return out


# ---- targets and cells ----------------------------------------------------------------------------
@dataclass
class Target:
    """One server under test: where, which protocol, which model name, how it is labelled."""

    url: str  # the endpoint POSTed to
    protocol: str  # "mimic" (this project's /v1/embed) or "openai" (/v1/embeddings, /embeddings)
    label: str
    model: str | None = None  # the OpenAI "model" field
    pid: int | None = None  # the server's process; None = found by its listening port

    @property
    def base(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    def body(self, texts: list[str]) -> dict:
        if self.protocol == "mimic":
            return {"items": [{"text": t} for t in texts], "role": "query"}
        return {"input": texts, "model": self.model}

    def vectors(self, answer: dict) -> list:
        """The embeddings of a 200 answer (raises KeyError / TypeError when it has none)."""
        if self.protocol == "mimic":
            return answer["embeddings"]
        return [row["embedding"] for row in answer["data"]]


def parse_target(spec: str) -> Target:
    """`URL[,model=NAME][,label=NAME][,pid=N]` -> Target (module docstring)."""
    url, *pairs = [p.strip() for p in spec.split(",")]
    url = check_loopback(url)
    extra = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in ("model", "label", "pid") or not value:
            raise ConfigError(f"--url {spec!r}: {pair!r} is not one of model=NAME, label=NAME, pid=N; e.g. "
                              "'http://127.0.0.1:7997/embeddings,model=all-MiniLM-L6-v2,label=infinity'")
        extra[key] = value
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    protocol = "mimic" if path in MIMIC_PATHS else "openai"
    if protocol == "mimic":
        url = f"{parts.scheme}://{parts.netloc}/v1/embed"
    elif "model" not in extra:
        raise ConfigError(f"--url {spec!r}: an OpenAI-style endpoint ({path}) needs the served model's name: "
                          f"append ',model=NAME'")
    pid = extra.get("pid")
    if pid is not None and not pid.isdigit():
        raise ConfigError(f"--url {spec!r}: pid={pid!r} is not a process id")
    label = extra.get("label") or ("mimic-engine" if protocol == "mimic" else parts.netloc)
    return Target(url, protocol, label, extra.get("model"), int(pid) if pid else None)


def parse_cells(value: str) -> list[tuple[int, int]]:
    """"1x1,16x1,4x32" -> [(concurrency, texts per request), ...]."""
    cells = []
    for part in (p.strip() for p in value.split(",") if p.strip()):
        m = re.fullmatch(r"(\d+)x(\d+)", part)
        if not m or not 1 <= int(m[1]) <= MAX_CONCURRENCY or not 1 <= int(m[2]) <= MAX_TEXTS_PER_REQUEST:
            raise ConfigError(f"cell {part!r}: expected CxK, C concurrent clients (1-{MAX_CONCURRENCY}) and K texts "
                              f"per request (1-{MAX_TEXTS_PER_REQUEST}), e.g. 1x1,16x1,4x32")
        cells.append((int(m[1]), int(m[2])))
    if not cells:
        raise ConfigError(f"--cells {value!r} names no cell; e.g. 1x1,16x1,4x32")
    return cells


def schedule(n_targets: int, cells: list, repeats: int) -> list[tuple[int, int, int]]:
    """-> [(repeat, cell index, target index)] in running order: per repeat and cell every target
    once, the targets' order rotated by one per repeat (A B, then B A)."""
    order = []
    for r in range(repeats):
        for c in range(len(cells)):
            order += [(r, c, (r + i) % n_targets) for i in range(n_targets)]
    return order


# ---- the server's process and its own timings -------------------------------------------------------
def listening_pid(port: int, proc: str = "/proc") -> int | None:
    """The process that listens on TCP `port` of this machine (Linux /proc), or None."""
    inodes = set()
    for table in ("net/tcp", "net/tcp6"):
        try:
            with open(os.path.join(proc, table)) as fh:
                next(fh)
                for line in fh:
                    cols = line.split()  # local "ADDR:PORT" hex, state 0A = LISTEN, inode in column 9
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{cols[9]}]")
        except (OSError, StopIteration):
            continue
    if not inodes:
        return None
    for pid in (p for p in os.listdir(proc) if p.isdigit()):
        fd_dir = os.path.join(proc, pid, "fd")
        try:
            for fd in os.listdir(fd_dir):
                if os.readlink(os.path.join(fd_dir, fd)) in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


def cpu_seconds(pid: int, proc: str = "/proc") -> float | None:
    """User + system CPU seconds of process `pid` (all its threads, and children it has waited for)."""
    try:
        with open(os.path.join(proc, str(pid), "stat")) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3
    except OSError:
        return None
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


STAGE_SERIES = re.compile(r'^mimic_request_stage_seconds_(sum|count)\{stage="([a-z]+)"\} ([0-9.eE+-]+)$', re.M)


def parse_stage_metrics(text: str) -> dict:
    """/metrics text -> {stage: {"sum": seconds, "count": n}} of mimic_request_stage_seconds."""
    out: dict = {}
    for kind, stage, value in STAGE_SERIES.findall(text):
        out.setdefault(stage, {})[kind] = float(value)
    return out


def stage_ms_per_request(before: dict, after: dict) -> dict | None:
    """Mean ms per request of each stage between two `parse_stage_metrics` snapshots."""
    out = {}
    for stage, a in after.items():
        b = before.get(stage, {})
        n = a.get("count", 0) - b.get("count", 0)
        if n > 0:
            out[stage] = 1e3 * (a.get("sum", 0.0) - b.get("sum", 0.0)) / n
    return out or None


# ---- one run -----------------------------------------------------------------------------------------
@dataclass
class CompareOptions:
    """The side-by-side benchmark, with its defaults."""

    targets: list  # [Target]
    cells: list = field(default_factory=lambda: list(DEFAULT_CELLS))  # [(concurrency, texts per request)]
    repeats: int = 2
    requests: int = 1000  # per run, at most
    duration_s: float = 60.0  # per run, at most
    texts: int = 1000  # distinct queries, cycled
    warmup: int = 20  # unreported requests per target and cell shape
    timeout_s: float = 30.0  # per request
    seed: int = 0


async def _load(session, target: Target, bodies: list, concurrency: int, requests: int, duration_s: float,
                timeout_s: float) -> tuple[list, float]:
    """POST bodies[i % len] for i < requests from `concurrency` clients -> ([(status, ms)], wall s)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    issued = [0]
    records = []
    deadline = time.perf_counter() + duration_s

    async def client():
        while issued[0] < requests and time.perf_counter() < deadline:
            i = issued[0]
            issued[0] += 1
            t0 = time.perf_counter()
            try:
                async with session.post(target.url, data=bodies[i % len(bodies)], timeout=timeout,
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    status = str(r.status)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = f"exception:{exc.__class__.__name__}"
            records.append((status, (time.perf_counter() - t0) * 1e3))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return records, time.perf_counter() - start


async def _metrics_text(session, target: Target) -> str | None:
    if target.protocol != "mimic":
        return None
    try:
        async with session.get(target.base + "/metrics") as r:
            return await r.text() if r.status == 200 else None
    except Exception:  # metrics are extra information; a server without them is still measured
        return None


async def _check(session, target: Target, texts: list[str]) -> None:
    """One request of `texts`: a 200 with one vector per text, else a MimicError saying what came back."""
    import aiohttp

    try:
        async with session.post(target.url, json=target.body(texts)) as r:
            status, answer = r.status, await r.text()
    except aiohttp.ClientError as exc:
        raise MimicError(f"{target.label}: no answer from {target.url} ({exc.__class__.__name__}: {exc}); is the "
                         "server running there?") from None
    if status != 200:
        raise MimicError(f"{target.label}: POST {target.url} answered {status}: {answer[:300]}")
    import json

    try:
        n = len(target.vectors(json.loads(answer)))
    except (ValueError, KeyError, TypeError):
        raise MimicError(f"{target.label}: the answer of {target.url} holds no embeddings in the {target.protocol} "
                         f"format: {answer[:300]}") from None
    if n != len(texts):
        raise MimicError(f"{target.label}: {len(texts)} texts sent, {n} embeddings came back")


def request_bodies(target: Target, texts: list[str], per_request: int) -> list[bytes]:
    """The texts cut into requests of `per_request` (cycling), as JSON bytes: the same inputs for every target."""
    import json

    n = max(1, len(texts) // per_request)
    return [json.dumps(target.body([texts[(i * per_request + j) % len(texts)] for j in range(per_request)])).encode()
            for i in range(n)]


async def _run_all(opts: CompareOptions, texts: list[str], pids: list) -> list[dict]:
    import aiohttp

    limit = max(c for c, _ in opts.cells)
    runs = []
    connector = aiohttp.TCPConnector(limit=limit, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        for target in opts.targets:
            await _check(session, target, texts[:2])
        for target in opts.targets:
            for k in sorted({k for _, k in opts.cells}):
                log(f"{target.label}: warm-up, {opts.warmup} requests of {k} texts", "bench serve")
                await _load(session, target, request_bodies(target, texts, k), min(4, limit), opts.warmup,
                            opts.duration_s, opts.timeout_s)
        for repeat, ci, ti in schedule(len(opts.targets), opts.cells, opts.repeats):
            target, (concurrency, per_request) = opts.targets[ti], opts.cells[ci]
            bodies = request_bodies(target, texts, per_request)
            log(f"repeat {repeat + 1}/{opts.repeats}, {concurrency}x{per_request}: {target.label}", "bench serve")
            metrics_before = await _metrics_text(session, target)
            cpu_before = cpu_seconds(pids[ti]) if pids[ti] else None
            records, wall = await _load(session, target, bodies, concurrency, opts.requests, opts.duration_s,
                                        opts.timeout_s)
            cpu_after = cpu_seconds(pids[ti]) if pids[ti] else None
            metrics_after = await _metrics_text(session, target)
            run = summarise(records, wall, per_request)
            run.update(target=target.label, repeat=repeat, concurrency=concurrency, texts_per_request=per_request)
            cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
            run["server_cpu_cores"] = None if cpu is None else cpu / wall
            run["server_cpu_ms_per_request"] = None if cpu is None or not run["sent"] else 1e3 * cpu / run["sent"]
            run["server_stage_ms"] = (stage_ms_per_request(parse_stage_metrics(metrics_before),
                                                           parse_stage_metrics(metrics_after))
                                      if metrics_before and metrics_after else None)
            runs.append(run)
    return runs


def summarise(records: list, wall_s: float, texts_per_request: int) -> dict:
    """[(status, ms)] of one run -> sent, ok, errors by status, rates and latency of the 2xx answers."""
    counts: dict[str, int] = {}
    for status, _ in records:
        counts[status] = counts.get(status, 0) + 1
    ok_ms = [ms for status, ms in records if status.startswith("2")]
    return {"sent": len(records), "ok": len(ok_ms), "errors": {s: n for s, n in sorted(counts.items())
                                                               if not s.startswith("2")},
            "wall_s": wall_s, "qps": len(ok_ms) / wall_s if wall_s > 0 else 0.0,
            "texts_per_s": len(ok_ms) * texts_per_request / wall_s if wall_s > 0 else 0.0,
            "latency_ms": latency_stats(ok_ms)}


def cell_summary(runs: list, targets: list, cells: list) -> list[dict]:
    """Per cell and target the median over repeats of QPS, texts/s, p50, p99 and CPU ms per request, and
    each target's ratios to the first target's (QPS ratio > 1 and p99 ratio < 1: better than the first)."""
    def median(values):
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else None

    out = []
    for concurrency, k in cells:
        rows = {}
        for t in targets:
            mine = [r for r in runs if r["target"] == t.label and (r["concurrency"], r["texts_per_request"])
                    == (concurrency, k)]
            lat = [r["latency_ms"] or {} for r in mine]
            rows[t.label] = {"qps": median([r["qps"] for r in mine]),
                             "texts_per_s": median([r["texts_per_s"] for r in mine]),
                             "p50_ms": median([x.get("median") for x in lat]), "p99_ms": median([x.get("p99") for x in lat]),
                             "server_cpu_ms_per_request": median([r["server_cpu_ms_per_request"] for r in mine]),
                             "server_cpu_cores": median([r["server_cpu_cores"] for r in mine]),
                             "model_ms_per_request": median([(r["server_stage_ms"] or {}).get("model") for r in mine]),
                             "repeats": len(mine)}
        first = rows[targets[0].label]
        for label, row in rows.items():
            row["qps_vs_first"] = _ratio(row["qps"], first["qps"])
            row["p99_vs_first"] = _ratio(row["p99_ms"], first["p99_ms"])
        out.append({"concurrency": concurrency, "texts_per_request": k, "targets": rows})
    return out


def _ratio(a, b):
    return None if a is None or not b else a / b


def run_compare(opts: CompareOptions) -> dict:
    """The whole side-by-side run -> the report written by --json: report.new_report's fields plus
    {"targets": [{"label", "url", "protocol", "model", "pid"}], "cells": [[C, K]], "repeats", "requests_per_run",
     "duration_limit_s", "texts": {"n", "min_words", "max_words", "seed"}, "warmup_requests",
     "runs": [summarise(...) + {"target", "repeat", "concurrency", "texts_per_request", "server_cpu_cores",
              "server_cpu_ms_per_request", "server_stage_ms"}] in running order,
     "summary": cell_summary(...)}."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise ConfigError(AIOHTTP_MISSING) from None
    if not opts.targets:
        raise ConfigError("no target: give at least one --url")
    labels = [t.label for t in opts.targets]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two targets share a label ({labels}); give each a distinct ',label=NAME'")
    if opts.repeats < 1 or opts.requests < 1 or opts.texts < 1:
        raise ConfigError(f"repeats={opts.repeats}, requests={opts.requests}, texts={opts.texts}: each must be >= 1")
    texts = english_queries(opts.texts, opts.seed, *QUERY_WORDS)
    pids = [t.pid if t.pid is not None else listening_pid(urlsplit(t.url).port or 80) for t in opts.targets]
    runs = asyncio.run(_run_all(opts, texts, pids))
    return new_report(SCHEMA, environment("cpu"),
                      targets=[{"label": t.label, "url": t.url, "protocol": t.protocol, "model": t.model, "pid": p}
                               for t, p in zip(opts.targets, pids)],
                      cells=[list(c) for c in opts.cells], repeats=opts.repeats, requests_per_run=opts.requests,
                      duration_limit_s=opts.duration_s, warmup_requests=opts.warmup,
                      texts={"n": opts.texts, "min_words": QUERY_WORDS[0], "max_words": QUERY_WORDS[1],
                             "seed": opts.seed},
                      runs=runs, summary=cell_summary(runs, opts.targets, opts.cells))
