"""The one shape of every 4xx/5xx answer, and the exception handlers that produce it:

    {"error": {"code": "invalid_image", "message": "...", "details": ...}}

except on the OpenAI-compatible routes (`OPENAI_PATHS`: /v1/embeddings, /v1/models, ...), whose
clients expect OpenAI's shape:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "input", "code": "invalid_image"}}

Routes raise `ApiError`; library errors (InputError, a full queue, a closed index, a full disk,
a damaged store, ...) and FastAPI's own (validation, 404, 405) are mapped here.
`add_error_handlers(app)` installs them; `CatchUnhandled` answers everything else with 500 without
letting the exception escape the app (it would make the server drop a keep-alive connection).
`ERROR_RESPONSES` documents the shape for the OpenAPI document.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from starlette.routing import Match

from ..errors import InputError, MimicError
from ..index.base import IndexClosedError
from ..index.store import StorageFullError, StoreDamagedError, replace_lone_surrogates
from ..runtime.batcher import EncodeTimeoutError, EncoderClosedError, QueueFullError

log = logging.getLogger("mimic_engine.server")


class ApiError(HTTPException):
    """An error answered as {"error": {"code", "message", "details"?}} with `status`; `param` names the
    request field at fault in OpenAI's shape."""

    def __init__(self, status: int, code: str, message: str, details: Any = None, headers: dict | None = None,
                 param: str | None = None):
        super().__init__(status, message, headers)
        self.code = code
        self.details = details
        self.param = param


OPENAI_PATHS = ("/v1/embeddings", "/embeddings", "/v1/models", "/models")


def is_openai_path(path: str) -> bool:
    return path in OPENAI_PATHS or path.startswith(("/v1/models/", "/models/"))


def openai_error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error")


def _printable_json(text: str | None) -> str | None:
    """`text` with lone UTF-16 surrogates (JSON can carry them, UTF-8 cannot) written as \\udxxx escapes."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, code: str, message: str, details: Any = None, headers: dict | None = None,
                   path: str = "", param: str | None = None):
    """The error answer for a request to `path`: OpenAI's shape on OPENAI_PATHS, the project's elsewhere."""
    if is_openai_path(path):
        body = {"message": _printable_json(message), "type": openai_error_type(status),
                "param": _printable_json(param), "code": code}
        return JSONResponse({"error": body}, status_code=status, headers=headers)
    body = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    # an error about bad text may quote it: never let a lone surrogate make the error itself unencodable
    return JSONResponse(replace_lone_surrogates({"error": body}), status_code=status, headers=headers)


STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type",
                422: "invalid_request", 429: "too_many_requests", 503: "unavailable", 507: "insufficient_storage"}

ERROR_MEANINGS = {
    400: "The body is not valid JSON (invalid_json), or a request the server cannot use (bad_request)",
    401: "The route needs the API key (unauthorized)",
    404: "No such document, thumbnail, model or route (not_found, no_thumbnail, model_not_found)",
    405: "The route does not take this method (method_not_allowed); the Allow header lists the ones it takes",
    413: "Over a limit: body, items per request, text, image pixels or metadata size",
    422: "A field is invalid: the code names what (invalid_request, invalid_text, invalid_image, invalid_k, ...)",
    500: "The server failed on this request (internal_error, store_damaged); it is logged",
    503: "Overloaded, timed out, starting or shutting down (overloaded, unavailable, not_ready); retry after "
         "Retry-After seconds",
    507: "The disk holding the index is full (insufficient_storage); nothing of the write was stored",
}


def error_responses(*statuses: int, model=None) -> dict:
    """The `responses=` entry of a route that can answer `statuses` (and 500), for the OpenAPI document;
    `model` the error body's schema (default: schemas.ErrorResponse, the project's shape)."""
    from .schemas import ErrorResponse

    return {status: {"model": model or ErrorResponse, "description": ERROR_MEANINGS[status]}
            for status in sorted({*statuses, 500})}


async def http_error(request: Request, exc: StarletteHTTPException):
    if isinstance(exc, ApiError):
        return error_response(exc.status_code, exc.code, exc.detail, exc.details, exc.headers, request.url.path,
                              exc.param)
    code = STATUS_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = getattr(exc, "headers", None)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}; see /docs for the API"
    if exc.status_code == 405:  # Starlette's Allow names only the first route of the path
        allowed = allowed_methods(request)
        headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        message = f"{request.method} is not a method of {request.url.path}; it takes {', '.join(allowed)}"
    return error_response(exc.status_code, code, message, headers=headers, path=request.url.path)


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app takes at this request's path (asked of the routes themselves,
    so routers included into the app are searched too)."""
    return [method for method in HTTP_METHODS
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in request.app.router.routes)]


async def validation_error(request: Request, exc: RequestValidationError):
    raw = exc.errors()
    errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in raw]
    bad_json = [e for e in raw if e.get("type") == "json_invalid"]
    if bad_json:
        why = str((bad_json[0].get("ctx") or {}).get("error", "JSON decode error"))
        at = bad_json[0].get("loc", ("body", "?"))[-1]
        return error_response(400, "invalid_json", f"the request body is not valid JSON: {why} at character {at}",
                              errors, path=request.url.path)
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    if first.get("type") == "invalid_text":  # the message names the field itself
        return error_response(422, "invalid_text", first["msg"], errors, path=request.url.path,
                              param=".".join(p for p in first["loc"] if p != "body") or None)
    where = ".".join(p for p in first["loc"] if p != "body") or "body"
    return error_response(422, "invalid_request", f"{where}: {first['msg']}", errors, path=request.url.path,
                          param=where)


async def queue_full(request: Request, exc: QueueFullError):
    return error_response(503, "overloaded", str(exc), headers={"Retry-After": str(exc.retry_after_s)},
                          path=request.url.path)


async def mimic_error(request: Request, exc: MimicError):
    if isinstance(exc, (EncodeTimeoutError, EncoderClosedError, IndexClosedError)):
        return error_response(503, "unavailable", str(exc), headers={"Retry-After": "1"}, path=request.url.path)
    if isinstance(exc, StorageFullError):
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return error_response(507, "insufficient_storage", "the disk holding the index is full: this write was not "
                              "stored (earlier acknowledged writes are safe, and searches go on); retry once the "
                              "operator has freed disk space", path=request.url.path)
    if isinstance(exc, StoreDamagedError):  # logged with the file by the store; the client gets no server paths
        return error_response(500, "store_damaged", "the index store is damaged where this request reads it; the "
                              "operator has been told in the server log (restore from a backup or rebuild)",
                              path=request.url.path)
    if isinstance(exc, InputError):
        return error_response(422, "invalid_input", str(exc), path=request.url.path)
    return error_response(400, "bad_request", str(exc), path=request.url.path)


def internal_error(scope, exc: Exception):
    log.error("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
    return error_response(500, "internal_error", f"the server failed on this request ({exc.__class__.__name__}); "
                          "it has been logged", path=scope.get("path", ""))


class CatchUnhandled:
    """ASGI middleware, inside the app's own error middleware: an unhandled exception becomes a 500
    in the error schema and goes no further. (Starlette's handler for Exception re-raises after
    answering, so the server logs it again and drops the keep-alive connection.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = [False]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if started[0]:  # the response is under way: the server ends that connection; log it once
                log.error("error after the response to %s %s began", scope.get("method"), scope.get("path"),
                          exc_info=exc)
                return
            await internal_error(scope, exc)(scope, receive, send)


def add_error_handlers(app: FastAPI) -> None:
    """One JSON shape for every 4xx/5xx (QueueFullError is a MimicError: the more specific handler wins)."""
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(QueueFullError, queue_full)
    app.add_exception_handler(MimicError, mimic_error)
    app.add_middleware(CatchUnhandled)
