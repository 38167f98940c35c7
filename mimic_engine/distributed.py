"""torch.distributed in one place: the process group of a torchrun job and the collectives that
training and corpus encoding share.

    torchrun --nproc-per-node 2 training/train.py --preset tiny ...            # data-parallel training
    torchrun --nproc-per-node 2 --no-python mimic-engine index build ...       # sharded corpus encoding
    torchrun --nproc-per-node 2 --no-python mimic-engine eval CKPT ...         # sharded evaluation

`init_from_env(device)` joins the job that torchrun describes in the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL when the processes use CUDA (process k on
GPU LOCAL_RANK), gloo on CPU. Without those variables, or with WORLD_SIZE=1, nothing is
initialised and every helper below is what a single process does (the identity, range(n), ...),
so a one-process run computes exactly what it computed before this module existed.

A collective that fails because another process of the job died raises `DistributedError`, a
MimicError that says so; torchrun then stops the job and prints the failed process's own error.
"""
from __future__ import annotations

import atexit
import datetime
import functools
import os

import numpy as np

from .errors import ConfigError, MimicError

# How long a collective waits for the other processes. Rank 0 alone runs the dev evaluations of a
# training run while the others wait, so this bounds an evaluation too.
TIMEOUT_ENV = "MIMIC_DIST_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 60.0
GRADIENT_BUCKET = 1 << 24  # elements per all-reduce of gradients (64 MiB of fp32)


class DistributedError(MimicError):
    """A collective operation failed: another process of the torchrun job stopped or hung."""


def _dist():
    import torch.distributed as dist

    return dist


def _active() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the job (1 without torchrun)."""
    return _dist().get_world_size() if _active() else 1


def rank() -> int:
    """This process's rank, 0 ... world_size() - 1 (0 without torchrun)."""
    return _dist().get_rank() if _active() else 0


def is_main() -> bool:
    """Rank 0: the process that writes files, logs and shows progress."""
    return rank() == 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} must be an integer (torchrun sets it)") from None


def _timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        minutes = float(text) if text else DEFAULT_TIMEOUT_MINUTES
    except ValueError:
        minutes = -1.0
    if minutes <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} must be a positive number of minutes "
                          f"(default {DEFAULT_TIMEOUT_MINUTES:g})")
    return datetime.timedelta(minutes=minutes)


def init_from_env(device: str = "auto") -> str:
    """Join the torchrun job described by the environment, once; -> the device this process uses.

    Without torchrun (no WORLD_SIZE, or 1) this is `resolve_device(device)` and nothing else. Under
    torchrun, "cuda" (or "auto" on a GPU machine) becomes "cuda:LOCAL_RANK" with NCCL, "cpu" uses
    gloo; an explicit "cuda:N" other than the process's own GPU is an error.
    """
    from .device import resolve_device

    resolved = resolve_device(device)
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1 and not _active():
        return resolved
    local = _env_int("LOCAL_RANK", 0)
    if resolved.startswith("cuda"):
        import torch

        if resolved != "cuda" and resolved != f"cuda:{local}":
            raise ConfigError(f"device={device!r} under torchrun: process {local} of this machine uses its own GPU; "
                              f"pass --device cuda (process k takes cuda:LOCAL_RANK)")
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local} but torch sees {torch.cuda.device_count()} GPU(s); start at most "
                              f"that many processes per node (torchrun --nproc-per-node)")
        torch.cuda.set_device(local)
        resolved = f"cuda:{local}"
    if not _active():
        dist = _dist()
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        dist.init_process_group("nccl" if resolved.startswith("cuda") else "gloo", timeout=_timeout())
        atexit.register(_shutdown)
    return resolved


def _shutdown() -> None:
    if _active():
        _dist().destroy_process_group()


def _comm_device():
    """Where collectives' tensors live: the process's GPU for NCCL, the CPU for gloo."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if _dist().get_backend() == "nccl" else torch.device("cpu")


def _collective(fn, *args, **kwargs):
    """Run a torch.distributed call; a failure (a peer died or hung) -> DistributedError."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        raise DistributedError(f"process {rank()} of {world_size()}: a collective operation failed, so another "
                               f"process of this job has stopped or hangs (see its own error above): {exc}") from exc


def shard_range(n: int, of_rank: int | None = None, of_world: int | None = None) -> range:
    """This process's contiguous share of positions 0 ... n-1, in rank order; the first n % world ranks
    get one more. Without torchrun: range(n). The shares of all ranks concatenate to range(n)."""
    r = rank() if of_rank is None else of_rank
    w = world_size() if of_world is None else of_world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def barrier() -> None:
    if world_size() > 1:
        _collective(_dist().barrier)


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s (picklable) `obj` on every rank; without torchrun `obj` itself."""
    if world_size() == 1:
        return obj
    box = [obj]
    _collective(_dist().broadcast_object_list, box, src=src)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over the ranks (float64); without torchrun the values themselves."""
    if world_size() == 1:
        return list(values)
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    _collective(_dist().all_reduce, t)
    return t.tolist()


def _all_gather_ints(values: list[int]) -> list[list[int]]:
    """Every rank's `values` (same length everywhere), in rank order."""
    import torch

    mine = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    out = [torch.empty_like(mine) for _ in range(world_size())]
    _collective(_dist().all_gather, out, mine)
    return [t.tolist() for t in out]


def gather_with_grad(x):
    """(n_r, ...) on each rank r -> (sum n_r, ...) on every rank: the rows of all ranks in rank order,
    differentiable. The backward pass sends every rank's gradient of the other ranks' rows back to
    their owner (as open_clip's gather_with_grad), so after `all_reduce_gradients` each parameter
    holds the gradient of the sum of all ranks' losses. Ranks may hold different row counts.
    Without torchrun: `x`."""
    if world_size() == 1:
        return x
    import torch

    sizes = [s[0] for s in _all_gather_ints([x.shape[0]])]
    pad = max(sizes) - x.shape[0]
    padded = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
    blocks = _gather_blocks().apply(padded.contiguous())  # (world, max n_r, ...)
    return torch.cat([block[:n] for block, n in zip(blocks, sizes)])


@functools.cache
def _gather_blocks():
    """The autograd function behind gather_with_grad (made on first use: torch is imported lazily)."""
    import torch

    class GatherBlocks(torch.autograd.Function):
        @staticmethod
        def forward(ctx, block):  # (m, ...) -> (world, m, ...): every rank's block
            out = [torch.empty_like(block) for _ in range(world_size())]
            _collective(_dist().all_gather, out, block)
            return torch.stack(out)

        @staticmethod
        def backward(ctx, grad):  # the sum over the ranks of their gradient of this rank's block
            grad = grad.contiguous()
            _collective(_dist().all_reduce, grad)
            return grad[rank()]

    return GatherBlocks


def all_reduce_gradients(parameters) -> None:
    """Sum each trainable parameter's .grad over the ranks (in place). A parameter no rank gave a
    gradient keeps .grad None (as in one process, so the optimiser skips it); where only some ranks
    did, the others count zeros. Without torchrun: nothing."""
    if world_size() == 1:
        return
    import torch
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    params = [p for p in parameters if p.requires_grad]
    has_grad = all_reduce_sum([float(p.grad is not None) for p in params])
    live = [p for p, h in zip(params, has_grad) if h > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: dict = {}
    for p in live:  # one flat buffer per dtype/device, cut into GRADIENT_BUCKET-sized all-reduces
        groups = buckets.setdefault((p.grad.dtype, p.grad.device), [[]])
        if groups[-1] and sum(g.numel() for g in groups[-1]) + p.grad.numel() > GRADIENT_BUCKET:
            groups.append([])
        groups[-1].append(p.grad)
    for groups in buckets.values():
        for grads in groups:
            flat = _flatten_dense_tensors(grads)
            comm = flat.to(_comm_device())
            _collective(_dist().all_reduce, comm)
            for g, summed in zip(grads, _unflatten_dense_tensors(comm.to(flat.device), grads)):
                g.copy_(summed)


def broadcast_module(module, src: int = 0) -> None:
    """Every parameter and buffer of `module` as rank `src` holds them (as DistributedDataParallel
    does at construction). Without torchrun: nothing."""
    if world_size() == 1:
        return
    import torch

    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            comm = t.data.to(_comm_device())
            _collective(_dist().broadcast, comm, src=src)
            t.data.copy_(comm.to(t.device))


def gather_rows(local: np.ndarray) -> np.ndarray | None:
    """Each rank's (n_r, E) float32 rows -> their concatenation in rank order on rank 0 (None on the
    others). A rank with no rows may pass shape (0, 0). Without torchrun: `local`."""
    if world_size() == 1:
        return local
    import torch

    local = np.ascontiguousarray(local, dtype=np.float32)
    shapes = _all_gather_ints(list(local.shape) if local.size else [0, 0])
    cols = max(c for _, c in shapes)
    if any(n and c != cols for n, c in shapes):
        raise DistributedError(f"the processes encoded vectors of different sizes {sorted({c for _, c in shapes})}; "
                               f"every process must load the same model")
    rows = max(n for n, _ in shapes)
    device = _comm_device()
    mine = torch.zeros((rows, cols), dtype=torch.float32, device=device)
    if local.size:
        mine[: len(local)] = torch.from_numpy(local).to(device)
    bucket = [torch.empty_like(mine) for _ in range(world_size())] if is_main() else None
    _collective(_dist().gather, mine, bucket, dst=0)
    if not is_main():
        return None
    return np.concatenate([t[:n].cpu().numpy() for t, (n, _) in zip(bucket, shapes)]) if rows else \
        np.zeros((0, cols), dtype=np.float32)
