"""Request and response bodies of the HTTP API (pydantic). Unknown fields are refused (422).

An item is {"text"?, "image"? (base64), "images"? [base64], "caption"?}; the caption is the text of
an image item. Which combinations make an item is checked where items are built (`routes.to_item`),
so that each refusal gets its own error code.
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="Passage, query or question text")
    image: str | None = Field(None, description="One image, base64 (a data: URL is accepted)")
    images: list[str] | None = Field(None, description="Several images of one item, base64")
    caption: str | None = Field(None, description="The text of an image item (use instead of text)")


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[ItemIn]
    role: Literal["query", "document"] = "document"


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int
    truncated: list[bool] = Field(description="Per item: its text was cut to the model's max_length tokens")
    model_id: str


class DocumentIn(ItemIn):
    id: str
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


class UpsertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    documents: list[DocumentIn]


class UpsertResponse(BaseModel):
    upserted: int
    truncated: list[bool]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: ItemIn
    k: int = 10
    modality: Literal["text", "image"] | None = None


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
