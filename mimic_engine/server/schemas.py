"""Request and response bodies of the HTTP API (pydantic). Unknown fields are refused (422).

An item is {"text"?, "image"? (base64), "images"? [base64], "caption"?}; the caption is the text of
an image item. Which combinations make an item is checked where items are built (`routes.to_item`),
so that each refusal gets its own error code; the schema states those rules (`minItems`, ...) for
clients without enforcing them a second time.

Every request body is a `RequestBody`: before anything else, each string in it (dict keys included)
must be valid Unicode, or the request is refused with 422 `invalid_text` naming the field.
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..index.store import unicode_problem


class RequestBody(BaseModel):
    """A request body (or a part of one): unknown fields refused, text checked to be valid Unicode."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode_only(cls, data):
        # JSON may carry lone surrogates ("\\ud800") that no response, tokenizer or store can encode
        problem = unicode_problem(data, "")
        if problem is not None:
            raise PydanticCustomError("invalid_text", "{problem}", {"problem": problem})
        return data


NOT_EMPTY = {"minProperties": 1}  # an item needs text or an image (checked in routes.to_item)


class ItemIn(RequestBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra=NOT_EMPTY)
    text: str | None = Field(None, description="Passage, query or question text")
    image: str | None = Field(None, description="One image, base64 (a data: URL is accepted)")
    images: list[str] | None = Field(None, description="Several images of one item, base64")
    caption: str | None = Field(None, description="The text of an image item (use instead of text)")


class EmbedRequest(RequestBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"items": [{"text": "when did the bridge open"}], "role": "query"}]})
    items: list[ItemIn] = Field(json_schema_extra={"minItems": 1})
    role: Literal["query", "document"] = "document"


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int
    truncated: list[bool] = Field(description="Per item: its text was cut to the model's max_length tokens")
    model_id: str


class DocumentIn(ItemIn):
    id: str = Field(json_schema_extra={"minLength": 1}, description="1 to max_id_chars printable characters")
    metadata: dict[str, Any] = Field(default_factory=dict)
    image_ref: str | None = Field(None, description="Where the image lives (stored, returned by search; optional)")

    @field_validator("metadata")
    @classmethod
    def _finite_numbers_only(cls, metadata: dict) -> dict:
        """Python's JSON parser accepts NaN and Infinity, which JSON does not have: stored, they would come
        back as null (data changed silently), so they are refused here with the key that holds them."""
        bad = non_finite_path(metadata, "metadata")
        if bad is not None:
            raise ValueError(f"{bad} is NaN or Infinity, which JSON cannot carry; send a finite number, a string "
                             "or null")
        return metadata


def non_finite_path(value, path: str) -> str | None:
    """The path of the first non-finite float inside nested dicts / lists, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        bad = non_finite_path(child, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]")
        if bad is not None:
            return bad
    return None


class UpsertRequest(RequestBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"documents": [{"id": "bridge", "text": "the bridge opened in 1890", "metadata": {"lang": "en"}}]}]})
    documents: list[DocumentIn] = Field(json_schema_extra={"minItems": 1})


class UpsertResponse(BaseModel):
    upserted: int
    truncated: list[bool]


class SearchRequest(RequestBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"query": {"text": "when did the bridge open"}, "k": 5, "modality": "text"}]})
    query: ItemIn
    k: StrictInt = Field(10, json_schema_extra={"minimum": 1}, description="Results, 1 to max_k")
    modality: Literal["text", "image"] | None = None


class DeleteResponse(BaseModel):
    deleted: str


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable reason, e.g. invalid_image, insufficient_storage")
    message: str = Field(description="What was wrong, what was expected and how to fix it")
    details: Any = None


class ErrorResponse(BaseModel):
    """The shape of every 4xx/5xx answer."""

    error: ErrorBody


class DocumentOut(BaseModel):
    id: str
    modality: str
    text: str | None = None
    caption: str | None = None
    image_ref: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class SearchHit(DocumentOut):
    score: float


class SearchResponse(BaseModel):
    results: list[SearchHit]
    truncated: bool


def document_out(doc, cls: type[DocumentOut] = DocumentOut, **extra) -> DocumentOut:
    """A stored document (index.StoredDocument) as the API returns it; `extra` fills `cls`'s other fields."""
    return cls(id=doc.id, modality=doc.modality, text=doc.text, caption=doc.caption, image_ref=doc.image_ref,
               metadata=doc.metadata, **extra)
