import base64

import pytest
import torch

from mimic_engine.errors import InputError
from mimic_engine.preprocess import Item, load_image
from tests.conftest import make_image_bytes


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("JPEG", "RGB"), ("PNG", "RGBA"), ("GIF", "L"), ("BMP", "RGB")])
def test_any_pil_format_becomes_normalised_rgb(fmt, mode, tiny_encoders):
    pre = tiny_encoders().preprocessor
    px = pre.pixels(make_image_bytes(0, (50, 20), fmt, mode))
    s = pre.config.vision.image_size
    assert px.shape == (3, s, s) and px.dtype == torch.float32 and torch.isfinite(px).all()


def test_base64_data_url_and_path(tmp_path):
    raw = make_image_bytes(1)
    assert load_image(base64.b64encode(raw).decode()).size == (40, 30)
    assert load_image("data:image/png;base64," + base64.b64encode(raw).decode()).mode == "RGB"
    p = tmp_path / "x.png"
    p.write_bytes(raw)
    assert load_image(str(p)).size == (40, 30)


def test_corrupt_inputs_name_the_item(tiny_encoders):
    pre = tiny_encoders().preprocessor
    with pytest.raises(InputError, match="doc-7.images\\[0\\].*cannot decode"):
        pre.collate([Item(text="ok"), Item(images=[b"not an image at all"], name="doc-7")])
    with pytest.raises(InputError, match="not valid base64"):
        load_image("@@@not base64@@@", "q")
    with pytest.raises(InputError, match="exceeds the limit"):
        load_image(make_image_bytes(0, (100, 100)), "big", max_pixels=5000)


def test_truncation_is_reported(tiny_encoders):
    pre = tiny_encoders().preprocessor
    ids, mask, truncated = pre.tokenize(["word " * 200, "short", None])
    assert ids.shape[1] == pre.max_length and truncated == [True, False, False]
    assert mask[2].sum() == 0 and mask[1].sum() > 0
    assert ids[0, pre.max_length - 1] == pre.tokenizer.sep_token_id  # the end token survives truncation


def test_too_many_images_per_item(tiny_encoders):
    pre = tiny_encoders().preprocessor
    n = pre.config.vision.max_images_per_item + 1
    with pytest.raises(InputError, match="at most"):
        pre.collate([Item(images=[make_image_bytes(i) for i in range(n)])])


def test_extreme_aspect_ratio_does_not_allocate_the_full_resize(tiny_encoders):
    from PIL import Image

    pre = tiny_encoders().preprocessor
    s = pre.config.vision.image_size
    # resizing the shorter side to S first would need an S x (S * 4M) intermediate (tens of GB)
    px = pre.image_tensor(Image.new("RGB", (1, 4_000_000), (200, 10, 10)))
    assert px.shape == (3, s, s) and torch.isfinite(px).all()


def test_cropped_resampling_matches_resize_then_crop(tiny_encoders):
    import numpy as np
    from PIL import Image

    pre = tiny_encoders().preprocessor
    s = pre.config.vision.image_size
    rng = np.random.default_rng(0)
    for w, h in ((37, 900), (1000, 23)):  # wider than MAX_RESIZE_SIDES crops: the cropped path
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        left, top = (nw - s) // 2, (nh - s) // 2
        full = img.resize((nw, nh), Image.BICUBIC).crop((left, top, left + s, top + s))
        want = pre.image_tensor(full)  # already S x S: only normalised
        np.testing.assert_allclose(pre.image_tensor(img).numpy(), want.numpy(), atol=0.05)


def test_only_raster_formats_are_decoded():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PCX")  # Pillow reads PCX, but it is not on the allow-list
    assert Image.open(io.BytesIO(buf.getvalue())).format == "PCX"
    with pytest.raises(InputError, match="cannot decode"):
        load_image(buf.getvalue(), "doc")


def test_decode_image_checks_the_header_before_decoding_pixels(monkeypatch):
    import io

    from PIL import Image, ImageFile

    from mimic_engine.preprocess import ImageFormatError, ImageTooLargeError, decode_image

    buf = io.BytesIO()
    Image.new("L", (3000, 2000)).save(buf, format="PNG", optimize=True)  # a few KB declaring 6M pixels
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels decoded before the size check"))
    with pytest.raises(ImageTooLargeError, match="doc: image of 3000x2000 = 6000000 pixels exceeds") as info:
        decode_image(buf.getvalue(), "doc", max_pixels=1_000_000)
    assert info.value.size == (3000, 2000) and info.value.max_pixels == 1_000_000
    with pytest.raises(ImageFormatError, match="doc: cannot decode") as info:
        decode_image(b"plain text", "doc")
    assert type(info.value.__cause__).__name__ == "UnidentifiedImageError"
    monkeypatch.undo()
    assert decode_image(make_image_bytes(0, (50, 20), "PNG", "L"), "doc").mode == "RGB"


def test_exif_orientation_is_applied():
    import io

    from PIL import Image

    from mimic_engine.preprocess import decode_image

    img = Image.new("RGB", (40, 10), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 5, 10))  # a blue strip on the left of a landscape image
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    shown = decode_image(buf.getvalue(), "photo")
    assert shown.size == (10, 40)  # portrait, as a viewer shows it
    assert shown.getpixel((5, 1))[2] > 200 and shown.getpixel((5, 38))[0] > 200  # the blue strip is on top


def test_mime_wrapped_base64_with_whitespace_is_accepted():
    raw = make_image_bytes(1)
    wrapped = base64.encodebytes(raw).decode()  # 76-character lines, as `base64` prints without -w0
    assert "\n" in wrapped.strip()
    assert load_image("  " + wrapped + "\r\n").size == (40, 30)
    assert load_image("data:image/png;base64,\n" + wrapped).size == (40, 30)


def test_pillow_bomb_guard_reports_the_configured_limit():
    import io

    from PIL import Image

    from mimic_engine.preprocess import ImageTooLargeError, decode_image

    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # 400M pixels: over Pillow's own 2 x 89.5M guard
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(buf.getvalue(), "doc", max_pixels=1_000_000)
    assert "400000000 pixels exceeds the limit of 1000000" in str(info.value), str(info.value)
    assert "178956970" not in str(info.value)


@pytest.mark.parametrize("preset_name", ["tiny", "small-effnet"])  # CLIP's and EfficientNet-Lite's mean / std
def test_normalisation_table_gives_the_arithmetic_values(preset_name):
    # pixels go through a per-channel lookup table; it must equal (x / 255 - mean) / std exactly
    import numpy as np
    from PIL import Image

    from mimic_engine.config import preset
    from mimic_engine.preprocess import Preprocessor

    config = preset(preset_name)
    pre = Preprocessor(config, type("Tok", (), {"pad_token_id": 0})())
    size = config.vision.image_size
    pixels = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    pixels[0, :3] = [[0, 0, 0], [255, 255, 255], [127, 128, 129]]  # both ends of the range
    got = pre.image_tensor(Image.fromarray(pixels))
    mean, std = np.asarray(config.vision.image_mean, np.float32), np.asarray(config.vision.image_std, np.float32)
    expected = ((pixels.astype(np.float32) / np.float32(255.0) - mean) / std).transpose(2, 0, 1)
    assert got.dtype == torch.float32 and got.shape == (3, size, size) and got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), expected)
