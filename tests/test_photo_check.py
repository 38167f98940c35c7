"""The real-photo sanity check of an image tower (mimic_engine/photo_check.py)."""
from __future__ import annotations

import numpy as np

from mimic_engine.photo_check import altered_views, check_encoder, sample_photos


def test_views_are_deterministic_crops_of_the_photo():
    photo = sample_photos()["flower"]
    first, again = altered_views(photo, 3, seed=5), altered_views(photo, 3, seed=5)
    assert [v.size for v in first] == [v.size for v in again]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    area = photo.size[0] * photo.size[1]
    assert all(0.5 * area <= v.size[0] * v.size[1] <= 0.86 * area for v in first)


class _SameVectorForEveryImage:
    """A tower that ignores the pixels: every view ties with every photo."""

    def encode(self, items, role="document"):
        return np.ones((len(items), 4), dtype=np.float32) / 2.0


def test_a_tower_that_ignores_the_pixels_fails_the_check():
    photos = dict(list(sample_photos().items())[:2])
    result = check_encoder(_SameVectorForEveryImage(), photos, views_per_photo=2)
    assert (result.photos, result.views) == (2, 4)
    assert result.top1 == 0.0 and result.mrr == 50.0 and result.chance_top1 == 50.0
    assert result.mean_cosine_between_photos == 1.0


def test_a_real_tiny_model_runs_the_check(tiny_encoders):
    photos = dict(list(sample_photos().items())[:2])
    result = check_encoder(tiny_encoders("decoder"), photos, views_per_photo=2)
    assert result.views == 4 and 0.0 <= result.top1 <= 100.0 and 50.0 <= result.mrr <= 100.0
    assert -1.0 <= result.mean_cosine_between_photos <= 1.0
