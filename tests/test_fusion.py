"""Decoder fusion's memory: each modality normalised on its own, and configs from before the option."""
import torch

from mimic_engine.config import MimicConfig, preset
from mimic_engine.modeling import build_model


def _fusion_inputs(b=3, t=5, v=16, h=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    visual = torch.randn(b, v, h, generator=g)
    vmask = torch.ones(b, v, dtype=torch.long)
    return ids, mask, visual, vmask


def test_visual_memory_scale_does_not_decide_the_attention():
    # Without per-modality normalisation, visual tokens 100x larger than the text states would take
    # over the cross-attention (or, 100x smaller, vanish from it). With it, only their direction counts.
    torch.manual_seed(0)
    model = build_model(preset("tiny", "decoder")).eval()
    ids, mask, visual, vmask = _fusion_inputs()
    with torch.no_grad():
        base = model.fusion_stage(ids, mask, visual, vmask)
        scaled = model.fusion_stage(ids, mask, visual * 100.0, vmask)
        other = model.fusion_stage(ids, mask, torch.randn_like(visual), vmask)
    assert torch.allclose(base, scaled, atol=1e-4)
    assert (base - other).abs().max() > 1e-3  # the image still matters


def test_raw_memory_is_scale_sensitive():
    torch.manual_seed(0)
    model = build_model(preset("tiny", "decoder", **{"fusion.memory_norm": False})).eval()
    ids, mask, visual, vmask = _fusion_inputs()
    with torch.no_grad():
        base = model.fusion_stage(ids, mask, visual, vmask)
        scaled = model.fusion_stage(ids, mask, visual * 100.0, vmask)
    assert (base - scaled).abs().max() > 1e-3


def test_configs_saved_before_memory_norm_keep_the_raw_memory():
    old = preset("tiny", "decoder").to_dict()
    del old["fusion"]["memory_norm"]
    cfg = MimicConfig.from_dict(old)
    assert cfg.fusion.memory_norm is False
    state = build_model(preset("tiny", "decoder", **{"fusion.memory_norm": False})).state_dict()
    build_model(cfg).load_state_dict(state)  # strict: the old weights fit exactly
    assert MimicConfig.from_dict(preset("tiny", "decoder").to_dict()).fusion.memory_norm is True
