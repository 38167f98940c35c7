"""A sanity check of a model's image tower on real photos: does it tell photos apart?

The demo corpus is digit scans, so its metrics say nothing about photographs. This check takes the
sample photos that scikit-learn ships (china, flower) and, when installed, scikit-image's bundled
ones (astronaut, coffee, rocket, chelsea the cat, ...), and asks each model to find every photo
again from altered views of it (a random crop of 55-85% of the area, a mirror image, a brightness
change), with the unaltered photos as the only documents (no captions):

    python -m mimic_engine.photo_check runs/compare/small/mimic/seed-0/ckpt.pt \
        runs/compare/small-effnet/mimic/seed-0/ckpt.pt

It prints, per model: top-1 accuracy and MRR of view -> photo (chance: 1 / number of photos), and
the mean cosine between two *different* photos (near 1.0 = the tower maps all photos alike). A tower
trained from scratch on 8 x 8 scans upscaled to 32 px is expected to fail it; a pretrained one to pass.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import numpy as np

VIEWS_PER_PHOTO = 3
# scikit-image's sample photos that ship inside its wheel (no download); chelsea is also `cat`
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "colorwheel", "camera", "coins", "horse", "moon", "page", "clock", "brick", "grass", "gravel")


@dataclass(frozen=True)
class PhotoCheck:
    photos: int
    views: int
    top1: float  # x100: views whose nearest photo is their own
    mrr: float  # x100
    chance_top1: float  # x100: 1 / photos
    mean_cosine_between_photos: float  # mean over pairs of different photos


def sample_photos() -> dict[str, "Image.Image"]:
    """name -> RGB PIL image: scikit-learn's two sample photos, plus scikit-image's when installed."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    photos = {os.path.basename(path).removesuffix(".jpg"): Image.fromarray(img)
              for path, img in zip(bunch.filenames, bunch.images)}
    try:
        import skimage.data
    except ImportError:
        return photos
    for name in SKIMAGE_PHOTOS:
        array = getattr(skimage.data, name)()
        photos[name] = Image.fromarray(array).convert("RGB")
    return photos


def altered_views(photo, count: int, seed: int) -> list:
    """`count` altered copies of a PIL image: random crop (55-85% of the area), mirrored every other
    view, brightness x0.75-1.25. Deterministic in `seed`."""
    from PIL import ImageEnhance, ImageOps

    rng = np.random.default_rng(seed)
    width, height = photo.size
    views = []
    for i in range(count):
        scale = float(np.sqrt(rng.uniform(0.55, 0.85)))
        w, h = max(1, int(width * scale)), max(1, int(height * scale))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        view = photo.crop((left, top, left + w, top + h))
        if i % 2 == 0:
            view = ImageOps.mirror(view)
        views.append(ImageEnhance.Brightness(view).enhance(float(rng.uniform(0.75, 1.25))))
    return views


def check_encoder(encoder, photos: dict, views_per_photo: int = VIEWS_PER_PHOTO, seed: int = 0) -> PhotoCheck:
    """Runs the check with a MimicEncoder (or anything with its `encode(items, role)`)."""
    from .preprocess import Item

    names = list(photos)
    docs = encoder.encode([Item(images=(photos[n],), name=n) for n in names], role="document")
    queries, owners = [], []
    for i, name in enumerate(names):
        for view in altered_views(photos[name], views_per_photo, seed * 1000 + i):
            queries.append(Item(images=(view,), name=f"{name} view"))
            owners.append(i)
    scores = encoder.encode(queries, role="query") @ docs.T  # (views, photos)
    own = scores[np.arange(len(owners)), owners]
    ranks = (scores >= own[:, None]).sum(axis=1)  # 1 = the own photo scores highest; ties count against it
    between = docs @ docs.T
    off = between[~np.eye(len(names), dtype=bool)]
    return PhotoCheck(photos=len(names), views=len(owners), top1=round(float((ranks == 1).mean() * 100), 2),
                      mrr=round(float((1.0 / ranks).mean() * 100), 2), chance_top1=round(100.0 / len(names), 2),
                      mean_cosine_between_photos=round(float(off.mean()), 4))


def main(argv: list[str] | None = None) -> int:
    from .encoder import MimicEncoder

    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m mimic_engine.photo_check CKPT [CKPT ...]", file=sys.stderr)
        return 2
    photos = sample_photos()
    print(f"{len(photos)} photos ({', '.join(photos)}), {VIEWS_PER_PHOTO} altered views each")
    print("| checkpoint | image tower | top-1 | MRR | chance top-1 | mean cosine between photos |")
    print("|---|---|---|---|---|---|")
    results = {}
    for path in paths:
        encoder = MimicEncoder.from_checkpoint(path, "cpu")
        vision = encoder.config.vision
        tower = f"{vision.kind} {vision.image_size}px" + (", pretrained" if vision.pretrained else ", from scratch")
        result = check_encoder(encoder, photos)
        results[path] = {"tower": tower, **result.__dict__}
        print(f"| {path} | {tower} | {result.top1:.1f} | {result.mrr:.1f} | {result.chance_top1:.1f} | "
              f"{result.mean_cosine_between_photos:.4f} |")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
