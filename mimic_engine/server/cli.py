"""`mimic-engine serve` (the HTTP server) and `mimic-engine search` (one query, no server).

With no arguments both use the demo setup, built on first use so they work on a fresh machine
(see server/bootstrap.py, which opens the model and the index for both). Every serve option can
also be set by an environment variable (MIMIC_<OPTION>, e.g. MIMIC_PORT=9000, MIMIC_API_KEY=...).
"""
from __future__ import annotations

import json
import logging
import time


import click

from ..cli_options import device_option, threads_option
from ..index.document_index import DEFAULTS as HNSW_DEFAULTS
from ..runtime import BACKENDS
from .bootstrap import open_backend_and_index
from .settings import ServerSettings

DEFAULTS = ServerSettings()
log = logging.getLogger("mimic_engine.server")


def setting_option(name: str, help: str, **kw):
    """A click option for ServerSettings.<name>: flag --<name>, env MIMIC_<NAME>, the dataclass default."""
    flag = "--" + name.replace("_", "-")
    kw.setdefault("default", getattr(DEFAULTS, name))
    kw.setdefault("show_default", kw["default"] is not None)
    return click.option(flag, name, envvar="MIMIC_" + name.upper(), show_envvar=True, help=help, **kw)


# ---- serve ----------------------------------------------------------------------------------------
@click.command("serve")
@setting_option("model", "Checkpoint (ckpt.pt) or export directory [default: the demo model, trained on first use].",
                type=click.Path(exists=True))
@setting_option("index", "Index folder, or milvus:<uri>[#<collection>] (milvus:./x.db runs Milvus Lite in-process, "
                "milvus:http://host:19530 a Milvus server; token from MIMIC_MILVUS_TOKEN) [default: the demo index for "
                "the demo model, else <home>/indexes/<model id>].")
@setting_option("model_name", "Model name listed by /v1/models and expected in /v1/embeddings requests "
                "[default: mimic-<first 12 hex of the model id>].")
@setting_option("host", "Address to bind (127.0.0.1 = this machine only).")
@setting_option("port", "Port to listen on.", type=click.IntRange(1, 65535))
@setting_option("backend", "Inference backend; 'auto' picks the fastest available and says why.",
                type=click.Choice(BACKENDS))
@device_option(default=DEFAULTS.device, envvar="MIMIC_DEVICE", show_envvar=True)
@threads_option(default=DEFAULTS.threads, envvar="MIMIC_THREADS", show_envvar=True)
@click.option("--batching/--no-batching", "batching", default=True, envvar="MIMIC_BATCHING", show_envvar=True,
              show_default=True, help="Dynamic batching of concurrent requests (--no-batching: each request on its own, "
              "the benchmark baseline).")
@click.option("--timing-header/--no-timing-header", "timing_header", default=DEFAULTS.timing_header,
              envvar="MIMIC_TIMING_HEADER", show_envvar=True, show_default=True,
              help="A Server-Timing header (preprocess, queue, model, respond / index ms) on encoding routes.")
@setting_option("max_batch", "Items per model batch.", type=click.IntRange(min=1))
@setting_option("max_batch_tokens", "Padded text + visual tokens per model batch.", type=click.IntRange(min=1))
@setting_option("max_wait_ms", "How long a batch waits for more requests, in ms.", type=click.FloatRange(0, 10_000))
@setting_option("max_queue", "Items queued at most; beyond it requests get 503 + Retry-After.", type=click.IntRange(min=1))
@setting_option("request_timeout_s", "Seconds a request may wait for its batch before 503.", type=click.FloatRange(min=0.001))
@setting_option("api_key", "Key required by write routes (Authorization: Bearer <key> or X-API-Key).")
@setting_option("max_body_bytes", "Largest request body.", type=click.IntRange(min=1))
@setting_option("max_items", "Items per /v1/embed, documents per /v1/documents.", type=click.IntRange(min=1))
@setting_option("max_image_pixels", "Largest decoded image, width x height.", type=click.IntRange(min=1))
@setting_option("max_text_chars", "Longest text in characters (token truncation beyond the model's length is reported).",
                type=click.IntRange(min=1))
@setting_option("max_k", "Largest k for /v1/search.", type=click.IntRange(min=1))
@click.option("--thumbnails/--no-thumbnails", "thumbnails", default=True, envvar="MIMIC_THUMBNAILS", show_envvar=True,
              show_default=True, help="Store a small preview (WebP, <= 256 px) of each uploaded image document, "
              "shown by the search page at /.")
@setting_option("max_metadata_bytes", "Largest metadata of one document, as UTF-8 JSON (returned with every hit).",
                type=click.IntRange(min=1))
@setting_option("hnsw_m", "HNSW links per node, for a new index.", type=click.IntRange(min=2),
                show_default=str(HNSW_DEFAULTS["M"]))
@setting_option("hnsw_ef_construction", "HNSW build breadth, for a new index.", type=click.IntRange(min=1),
                show_default=str(HNSW_DEFAULTS["ef_construction"]))
@setting_option("hnsw_ef", "HNSW search breadth (saved with the index).", type=click.IntRange(min=1),
                show_default=f"the index's, else {HNSW_DEFAULTS['ef']}")
@click.option("--log-level", envvar="MIMIC_LOG_LEVEL", show_envvar=True, default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve_command(log_level, **options):
    """Serve embedding and search over HTTP (OpenAPI docs at /docs)."""
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(**options).validate()
    t0 = time.perf_counter()
    backend, index = open_backend_and_index(settings)
    backend.warmup()
    app = create_app(settings, backend, index)
    click.echo(f"serving model {backend.model_id[:12]} ({backend.name}, dim {backend.dim}) with index {index.path} "
               f"({index.count()} documents) on http://{settings.host}:{settings.port} (search page: /, docs: /docs); "
               f"batching {'on' if settings.batching else 'off'}; ready in {time.perf_counter() - t0:.1f} s", err=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, timeout_graceful_shutdown=30)


# ---- search ---------------------------------------------------------------------------------------
@click.command("search")
@click.argument("query", required=False)
@click.option("--image", "image_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Image file of the query (repeat for several); with QUERY it is an image+text query.")
@click.option("--index", envvar="MIMIC_INDEX", default=None,
              help="Index folder or milvus:<uri>[#<collection>] [default: as for serve].")
@click.option("--model", envvar="MIMIC_MODEL", type=click.Path(exists=True), default=None,
              help="Checkpoint or export directory [default: the demo model].")
@click.option("--backend", envvar="MIMIC_BACKEND", type=click.Choice(BACKENDS), default="auto", show_default=True)
@device_option(envvar="MIMIC_DEVICE")
@click.option("-k", "k", type=click.IntRange(1, 10_000), default=10, show_default=True, help="Results to show.")
@click.option("--modality", type=click.Choice(["text", "image"]), default=None, help="Only documents of this modality.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def search_command(query, image_paths, index, model, backend, device, k, modality, as_json):
    """Search an index from the command line (no server): text, image, or both as the query."""
    from ..errors import InputError
    from ..preprocess import Item

    if not (query and query.strip()) and not image_paths:
        raise InputError("give a QUERY text, an --image, or both")
    settings = ServerSettings(model=model, index=index, backend=backend, device=device)
    enc, idx = open_backend_and_index(settings, progress=not as_json)
    try:
        vector = enc.encode([Item(text=query, images=list(image_paths), name="query")], role="query")[0]
        hits = idx.search(vector, k, modality=modality)
    finally:
        idx.close()
        enc.close()
    if as_json:
        click.echo(json.dumps([{"score": float(s), **d.to_dict()} for d, s in hits], indent=2, ensure_ascii=False))
        return
    if not hits:
        click.echo("no results (the index is empty or holds no document of that modality)")
    for rank, (doc, score) in enumerate(hits, 1):
        shown = doc.text if doc.modality == "text" else (doc.caption or doc.image_ref or "")
        shown = " ".join((shown or "").split())
        click.echo(f"{rank:3d}  {score:7.4f}  {doc.modality:5s}  {doc.id}  {shown[:90]}")


__all__ = ["serve_command", "search_command"]
