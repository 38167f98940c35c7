"""The one shape of every 4xx/5xx answer, and the exception handlers that produce it:

    {"error": {"code": "invalid_image", "message": "...", "details": ...}}

except on the OpenAI-compatible routes (`OPENAI_PATHS`: /v1/embeddings, /v1/models, ...), whose
clients expect OpenAI's shape:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "input", "code": "invalid_image"}}

Routes raise `ApiError`; library errors (InputError, a full queue, a closed index, ...) and
FastAPI's own (validation, 404, 405) are mapped here. `add_error_handlers(app)` installs them.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError, MimicError
from ..index.base import IndexClosedError
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
    return JSONResponse({"error": body}, status_code=status, headers=headers)


STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type",
                422: "invalid_request", 429: "too_many_requests", 503: "unavailable"}


async def http_error(request: Request, exc: StarletteHTTPException):
    if isinstance(exc, ApiError):
        return error_response(exc.status_code, exc.code, exc.detail, exc.details, exc.headers, request.url.path,
                              exc.param)
    code = STATUS_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}; see /docs for the API"
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None), path=request.url.path)


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
    where = ".".join(p for p in first["loc"] if p != "body") or "body"
    return error_response(422, "invalid_request", f"{where}: {first['msg']}", errors, path=request.url.path,
                          param=where)


async def queue_full(request: Request, exc: QueueFullError):
    return error_response(503, "overloaded", str(exc), headers={"Retry-After": str(exc.retry_after_s)},
                          path=request.url.path)


async def mimic_error(request: Request, exc: MimicError):
    if isinstance(exc, (EncodeTimeoutError, EncoderClosedError, IndexClosedError)):
        return error_response(503, "unavailable", str(exc), headers={"Retry-After": "1"}, path=request.url.path)
    if isinstance(exc, InputError):
        return error_response(422, "invalid_input", str(exc), path=request.url.path)
    return error_response(400, "bad_request", str(exc), path=request.url.path)


async def internal_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", f"the server failed on this request ({exc.__class__.__name__}); "
                          "it has been logged", path=request.url.path)


def add_error_handlers(app: FastAPI) -> None:
    """One JSON shape for every 4xx/5xx (QueueFullError is a MimicError: the more specific handler wins)."""
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(QueueFullError, queue_full)
    app.add_exception_handler(MimicError, mimic_error)
    app.add_exception_handler(Exception, internal_error)
