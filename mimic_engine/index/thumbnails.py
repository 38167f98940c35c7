"""Thumbnails of image documents: what a search page shows for an image hit.

    data = make_thumbnail(pil_image)        # WebP bytes, longest side <= THUMBNAIL_MAX_SIDE
    media_type(data)                        # "image/webp" (or "image/jpeg" for a JPEG thumbnail)

An index stores one per image document (StoredDocument.thumbnail, the store's `thumbnails`
table), written at upsert unless turned off; images smaller than the limit keep their size (a
page scales them up, never the store).
"""
from __future__ import annotations

THUMBNAIL_MAX_SIDE = 256  # pixels, the longest side
THUMBNAIL_FORMAT = "WEBP"
THUMBNAIL_QUALITY = 80  # lossy WebP: about 5-15 KB for a 256 px photo


def make_thumbnail(image, max_side: int = THUMBNAIL_MAX_SIDE) -> bytes:
    """A PIL image -> WebP bytes of at most `max_side` pixels on its longest side (aspect kept)."""
    import io

    from PIL import Image

    small = image.convert("RGB") if image.mode != "RGB" else image.copy()
    small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, format=THUMBNAIL_FORMAT, quality=THUMBNAIL_QUALITY, method=4)
    return out.getvalue()


def media_type(data: bytes) -> str:
    """The HTTP content type of stored thumbnail bytes (from their magic numbers)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    return "application/octet-stream"
