"""InfoNCE over in-batch candidates with the learnable logit scale (as MARVEL and UniVL-DR)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(queries: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor,
                     targets: torch.Tensor, ignore: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """queries (R, E) and candidates (C, E) unit vectors, targets (R,) candidate index of each row's
    positive, ignore (R, C) bool: candidates masked out of a row's softmax (its other positives).

    loss = mean_r CE(scale * q_r . c, target_r). Returns (loss, {"acc": in-batch top-1 accuracy}).
    """
    logits = scale * queries.float() @ candidates.float().T  # (R, C)
    if ignore is not None:
        logits = logits.masked_fill(ignore, float("-inf"))  # a target is never ignored, so no row is all -inf
    loss = F.cross_entropy(logits, targets)
    acc = (logits.argmax(dim=1) == targets).float().mean()
    return loss, {"acc": float(acc)}
