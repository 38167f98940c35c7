"""Towers, the three fusions and the factory (`build_model`)."""
from .model import EncoderBatch, MimicModel, build_model, gather_visual_tokens

__all__ = ["EncoderBatch", "MimicModel", "build_model", "gather_visual_tokens"]
