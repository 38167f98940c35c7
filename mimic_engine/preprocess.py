"""Preprocessing shared by training, evaluation, export and serving.

Tokenising with truncation, image decoding (any format PIL reads, converted to RGB), CLIP-style
resize / centre-crop / normalise, base64, and collation of mixed items into an `EncoderBatch`.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np
import torch

from .config import MimicConfig
from .errors import InputError

# An image may be given as a PIL image, raw bytes, a base64 string ("data:" URLs too) or a file path.
ImageSource = Union["PIL.Image.Image", bytes, str, os.PathLike]  # noqa: F821

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # decompression-bomb guard (about 6300 x 6300)
# Raster formats decoded for items. An allow-list, so that e.g. EPS (which Pillow hands to
# Ghostscript when installed) is never parsed from untrusted input.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "ICO", "JPEG2000")
MAX_RESIZE_SIDES = 8  # longer side of the resized image, in crops, beyond which only the crop is resampled


@dataclass
class Item:
    """One query or document: text-only, image-only or image(s) + text (a caption, question or passage)."""

    text: str | None = None
    images: Sequence[ImageSource] = field(default_factory=tuple)
    name: str | None = None  # used in error messages (a document id, "items[3]", ...)

    def __post_init__(self):
        if self.text is not None and not isinstance(self.text, str):
            raise InputError(f"{self.label}: text must be a string, got {type(self.text).__name__}")
        if isinstance(self.images, (str, bytes)) or not isinstance(self.images, Sequence):
            self.images = (self.images,) if self.images is not None else ()
        if not self.has_text and not self.images:
            raise InputError(f"{self.label}: an item needs text, at least one image, or both; it has neither")

    @property
    def label(self) -> str:
        return self.name or "item"

    @property
    def has_text(self) -> bool:
        return self.text is not None and self.text.strip() != ""

    @property
    def modality(self) -> str:
        return "image" if self.images else "text"


def decode_base64(data: str, name: str = "image") -> bytes:
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    # MIME base64 (the `base64` tool without -w0) wraps lines; whitespace is never part of the data
    data = "".join(data.split())
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{name}: not valid base64 ({exc}); send the image file's bytes base64-encoded") from exc


def encode_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class ImageTooLargeError(InputError):
    """An image with more pixels than allowed, refused from its header before any pixel is decoded.
    `size` is the declared (width, height), None when Pillow's own bomb guard refused the header."""

    def __init__(self, message: str, size: tuple[int, int] | None, max_pixels: int):
        super().__init__(message)
        self.size = size
        self.max_pixels = max_pixels


class ImageFormatError(InputError):
    """Bytes whose header is not an image of IMAGE_FORMATS (the cause is Pillow's exception)."""


def decode_image(raw: bytes, name: str = "image", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """Image file bytes -> RGB PIL image. The file is opened once: its header gives the format and the
    size, which is checked against `max_pixels` before any pixel is decoded.

    Raises ImageTooLargeError (over `max_pixels`), ImageFormatError (not a readable image) or
    InputError (the header is fine but the pixel data is corrupt), each naming `name`."""
    from PIL import Image, ImageOps

    try:
        img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own guard, normally far above max_pixels: say ours
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(declared.group(1)) if declared else None
        if pixels is not None and pixels <= max_pixels:  # max_pixels was set above Pillow's guard
            raise ImageTooLargeError(f"{name}: image of {pixels} pixels exceeds the image decoder's own limit of "
                                     f"{2 * Image.MAX_IMAGE_PIXELS} (Pillow's decompression-bomb guard), below the "
                                     f"configured {max_pixels}; downscale it before sending", None, max_pixels) from exc
        size = f"{pixels} pixels" if pixels is not None else "more pixels than the decoder allows"
        raise ImageTooLargeError(f"{name}: image of {size} exceeds the limit of {max_pixels}; downscale it before "
                                 "sending", None, max_pixels) from exc
    except Exception as exc:  # Pillow raises many types for bytes it cannot identify
        raise ImageFormatError(f"{name}: cannot decode as an image ({exc.__class__.__name__}: {exc})") from exc
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{name}: image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}; "
                                 "downscale it before sending", (w, h), max_pixels)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{name}: cannot decode as an image ({exc.__class__.__name__}: {exc})") from exc
    try:
        img = ImageOps.exif_transpose(img)  # a photo as it is shown, not as the camera stored it
    except Exception:  # unreadable EXIF (Pillow raises many types): the pixels as stored are still the image
        pass
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(src: ImageSource, name: str = "image", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """Any image source -> RGB PIL image (bytes, base64 and files through `decode_image`). Corrupt or
    non-image input raises InputError naming `name`."""
    from PIL import Image

    if isinstance(src, Image.Image):  # already decoded: only the limit and the mode are checked
        w, h = src.size
        if w * h > max_pixels:
            raise ImageTooLargeError(f"{name}: image of {w}x{h} pixels exceeds the limit of {max_pixels}", (w, h),
                                     max_pixels)
        return src.convert("RGB") if src.mode != "RGB" else src
    if isinstance(src, (bytes, bytearray, memoryview)):
        raw = bytes(src)
    elif isinstance(src, (str, os.PathLike)) and os.path.isfile(src):
        with open(src, "rb") as fh:
            raw = fh.read()
    elif isinstance(src, str):
        raw = decode_base64(src, name)
    else:
        raise InputError(f"{name}: expected image bytes, a base64 string or a file path, got {type(src).__name__}")
    return decode_image(raw, name, max_pixels)


class Preprocessor:
    """Turns items into model inputs exactly as the model was trained. Stateless besides the tokenizer."""

    def __init__(self, config: MimicConfig, tokenizer, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.config = config
        self.tokenizer = tokenizer
        self.max_length = config.text.max_length
        self.max_image_pixels = max_image_pixels
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        mean, std = (np.asarray(v, np.float32)[:, None] for v in (config.vision.image_mean, config.vision.image_std))
        self._pixel_table = (np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0) - mean) / std  # (3, 256)

    # ---- text -----------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str | None], pad_to: int | None = None):
        """-> input_ids (B, T) int64, attention_mask (B, T) int64, truncated [bool] * B.

        A None or blank text gives an all-zero mask row (the item has no text). T is the longest
        row (at least 2), or `pad_to`.
        """
        present = [t if (t is not None and t.strip()) else "" for t in texts]
        enc = self.tokenizer(present, add_special_tokens=True, truncation=False)["input_ids"]
        truncated = [len(ids) > self.max_length for ids in enc]
        enc = [ids[: self.max_length - 1] + ids[-1:] if len(ids) > self.max_length else ids for ids in enc]
        t = max([len(ids) for ids in enc] + [2]) if pad_to is None else pad_to
        input_ids = torch.full((len(enc), t), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(enc), t), dtype=torch.long)
        for i, ids in enumerate(enc):
            input_ids[i, : len(ids)] = torch.tensor(ids[:t], dtype=torch.long)
            if present[i]:
                attention_mask[i, : len(ids)] = 1
        return input_ids, attention_mask, truncated

    # ---- images ---------------------------------------------------------------------------------
    def load_image(self, src: ImageSource, name: str = "image"):
        return load_image(src, name, self.max_image_pixels)

    def image_tensor(self, img) -> torch.Tensor:
        """RGB PIL image -> (3, S, S) float32, resized/cropped/normalised as the vision backbone expects."""
        from PIL import Image

        vc = self.config.vision
        s = vc.image_size
        if vc.resize_mode == "squash":
            img = img.resize((s, s), Image.BICUBIC)
        else:  # shorter side to S, centre crop (CLIP)
            w, h = img.size
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            left, top = (nw - s) // 2, (nh - s) // 2
            if max(nw, nh) <= MAX_RESIZE_SIDES * s:
                img = img.resize((nw, nh), Image.BICUBIC)
                img = img.crop((left, top, left + s, top + s))
            else:  # extreme aspect ratio (e.g. 1 x 25M px): resample only the crop's source region, so the
                # (nw, nh) intermediate (terabytes for such an image) is never allocated; same sample positions
                sx, sy = nw / w, nh / h
                img = img.resize((s, s), Image.BICUBIC, box=(left / sx, top / sy, (left + s) / sx, (top + s) / sy))
        # (S, S, 3) uint8 -> (3, S, S) float32 through the per-channel table of (x / 255 - mean) / std:
        # one gather per channel, the same values as the arithmetic, 6x faster (a 224 px image is
        # 600 KB of floats)
        pixels = np.asarray(img, dtype=np.uint8)
        out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        for c in range(3):
            np.take(self._pixel_table[c], pixels[..., c], out=out[c])
        return torch.from_numpy(out)

    def pixels(self, src: ImageSource, name: str = "image") -> torch.Tensor:
        return self.image_tensor(self.load_image(src, name))

    # ---- batches --------------------------------------------------------------------------------
    def collate(self, items: Sequence[Item]):
        """Mixed items -> EncoderBatch. Images are decoded here; an undecodable one names its item."""
        from .modeling import EncoderBatch

        if not items:
            raise InputError("an empty list of items was given; send at least one item")
        limit = self.config.vision.max_images_per_item
        pixel_list, counts = [], []
        for i, item in enumerate(items):
            if len(item.images) > limit:
                raise InputError(f"{item.name or f'items[{i}]'}: {len(item.images)} images, at most {limit} per item "
                                 "(vision.max_images_per_item)")
            for j, src in enumerate(item.images):
                pixel_list.append(self.pixels(src, f"{item.name or f'items[{i}]'}.images[{j}]"))
            counts.append(len(item.images))
        input_ids, attention_mask, truncated = self.tokenize([it.text for it in items])
        s = self.config.vision.image_size
        pixel_values = torch.stack(pixel_list) if pixel_list else torch.zeros(0, 3, s, s)
        return EncoderBatch(input_ids, attention_mask, pixel_values, torch.tensor(counts, dtype=torch.long), truncated)


def load_tokenizer(config: MimicConfig):
    """The tokenizer named by the config (a local folder or the bundled MiniLM one)."""
    from transformers import AutoTokenizer

    from .modeling.towers import resolve_pretrained

    source = config.text.tokenizer or config.text.pretrained
    if source is None:
        raise InputError("config.text.tokenizer is not set; give a local tokenizer folder or 'minilm'")
    return AutoTokenizer.from_pretrained(resolve_pretrained(source), local_files_only=True)
