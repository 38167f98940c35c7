"""InfoNCE over in-batch candidates with the learnable logit scale (as MARVEL and UniVL-DR)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(queries: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor,
                     targets: torch.Tensor, ignore: torch.Tensor | None = None,
                     total_rows: int | None = None) -> tuple[torch.Tensor, dict]:
    """queries (R, E) and candidates (C, E) unit vectors, targets (R,) candidate index of each row's
    positive, ignore (R, C) bool: candidates masked out of a row's softmax (its other positives).

    loss = mean_r CE(scale * q_r . c, target_r). Returns (loss, {"acc": in-batch top-1 accuracy}).
    `total_rows` (data-parallel training, where this process holds R of the step's rows and the
    candidates of all processes): loss and acc are sums over the R rows divided by `total_rows`, so
    that the processes' values add up to the whole batch's mean.
    """
    logits = scale * queries.float() @ candidates.float().T  # (R, C)
    if ignore is not None:
        logits = logits.masked_fill(ignore, float("-inf"))  # a target is never ignored, so no row is all -inf
    hits = (logits.argmax(dim=1) == targets).float()
    if total_rows is None:
        return F.cross_entropy(logits, targets), {"acc": float(hits.mean())}
    return F.cross_entropy(logits, targets, reduction="sum") / total_rows, {"acc": float(hits.sum()) / total_rows}
