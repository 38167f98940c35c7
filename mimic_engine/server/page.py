"""The search page at `/`: plain HTML, CSS and JavaScript shipped in the package (static/), no build
step, nothing fetched from elsewhere, so it works offline.

    GET /?q=What+is+the+square+of+13&modality=text&k=10     the page with that search's results
    GET /static/{app.js, style.css}

A text search lives in the URL, so a result set is a link: the server runs the search named by
`q`, `modality` and `k` and embeds the results in the page as JSON, which static/app.js renders
while the page loads (a headless `chromium --dump-dom` of the URL shows them). Searches typed or
uploaded later go through POST /v1/search. Everything a document holds is shown as text (never as
markup); the JSON block is escaped so no stored string can close its <script> element.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from ..errors import MimicError
from .api_errors import ApiError
from .routes import ServerState, run_search, server_state
from .schemas import ItemIn, SearchRequest

DEFAULT_K = 12  # a 3 or 4 column grid, filled
STATE_MARKER = "__INITIAL_STATE__"
# the page runs only its own script and shows only its own images (thumbnails) and the user's upload
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
                           "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

router = APIRouter()


def static_dir():
    return resources.files("mimic_engine.server") / "static"


@lru_cache(maxsize=1)
def page_template() -> str:
    return (static_dir() / "index.html").read_text(encoding="utf-8")


def script_json(value) -> str:
    """JSON safe inside a <script> element: '<', '>' and '&' escaped, so '</script>' or '<!--' in a document's
    text cannot end the element; ASCII only (a lone surrogate becomes its escape)."""
    return json.dumps(value, ensure_ascii=True).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def url_search(state: ServerState, q: str, modality: str | None, k: str | None) -> dict:
    """The search a page URL names -> {"results": [...], "truncated"} or {"error": message}."""
    if modality not in (None, "", "text", "image"):
        return {"error": f"modality={modality!r}; expected text, image or nothing (any modality)"}
    try:
        k_value = DEFAULT_K if k in (None, "") else int(k)
    except ValueError:
        return {"error": f"k={k!r} is not a whole number; expected 1 to {state.settings.max_k}"}
    try:
        found = run_search(state, SearchRequest(query=ItemIn(text=q), k=k_value, modality=modality or None))
    except ApiError as exc:
        return {"error": exc.detail}
    except MimicError as exc:  # overloaded, shutting down, bad input: the page says so
        return {"error": str(exc)}
    return found.model_dump()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def search_page(q: str | None = None, modality: str | None = None, k: str | None = None,
                state: ServerState = Depends(server_state)):
    initial = {"max_k": state.settings.max_k, "default_k": DEFAULT_K,
               "search": url_search(state, q, modality, k) if q and q.strip() else None}
    html = page_template().replace(STATE_MARKER, script_json(initial))
    return HTMLResponse(html, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                       "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


def add_search_page(app: FastAPI) -> None:
    """The page at / and its files at /static."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(static_dir())), name="static")
