"""What `mimic-engine serve` and `search` open: a backend and an index, with the demo set-up as default.

With no model and no index given, both use the demo setup, built on first use so they work on a
fresh machine: the demo model `<home>/demo-model-v<N>-<preset>/ckpt.pt` (trained once, about 5 minutes
on 2 CPU cores) and the index `<home>/demo-index-v<N>-<preset>` (filled from the demo corpus when empty),
N being the demo corpus version and <preset> the default preset (`small-effnet`); `<home>` is
$MIMIC_HOME or ~/.cache/mimic-engine. The demo model is the published comparison's MiMIC run for seed 0
(`mimic-engine compare`: the same options, an equal step budget, no time limit), so docs/results.md
describes the model that is served, on a busy machine as on an idle one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from typing import Callable

from .settings import ServerSettings


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def demo_paths():
    """-> (the demo checkpoint, the demo index folder) under the mimic-engine home. Both are named after
    the demo corpus version and the default preset, so a model trained on an earlier corpus, or with
    the image tower of an earlier default, is never served (a new version trains and indexes afresh;
    the old folders can be deleted)."""
    from ..config import DEFAULT_PRESET
    from ..data import default_home
    from ..data.demo import FORMAT_VERSION

    home, name = default_home(), f"v{FORMAT_VERSION}-{DEFAULT_PRESET}"
    return home / f"demo-model-{name}" / "ckpt.pt", home / f"demo-index-{name}"


def ensure_demo_model(echo: Callable[[str], None] = _stderr) -> str:
    """The demo checkpoint, trained first if missing (once per machine).

    Training runs in `demo-model-v<N>-<preset>.partial/` and the folder is renamed into place only when
    training and its final evaluation have finished, so an interrupted first start never leaves a half-trained
    model that later starts would take for the real one; the next start resumes from its last.pt.
    """
    import dataclasses

    from ..training import run as training
    from ..training.comparison import DEFAULT_STEPS, VARIANTS, run_options
    from ..training.options import TrainOptions

    ckpt, _ = demo_paths()
    if ckpt.is_file():
        return str(ckpt)
    partial = ckpt.parent.with_name(ckpt.parent.name + ".partial")
    resume = partial / "last.pt"
    comparison_run = run_options(TrainOptions(data="demo"), VARIANTS["mimic"], seed=0, out=str(partial),
                                 steps=DEFAULT_STEPS, minutes=None)
    if resume.is_file():
        echo(f"Resuming the interrupted training of the demo model in {partial}.")
    else:
        echo(f"No demo model at {ckpt}: training one now (preset {comparison_run.preset!r} on the demo corpus, "
             f"{DEFAULT_STEPS} steps, about 5 minutes on 2 idle CPU cores; this happens once). Pass --model to serve "
             "your own checkpoint or export.")
    options = dataclasses.replace(comparison_run, out=str(partial), progress=True,
                                  resume=str(resume) if resume.is_file() else None)
    training.run_training(options, echo=echo)
    if ckpt.parent.exists():  # a stale folder without ckpt.pt
        shutil.rmtree(ckpt.parent)
    os.replace(partial, ckpt.parent)
    return str(ckpt)


def default_index_path(root, backend) -> str:
    """`root/<first 16 hex of the model id>`; an existing folder named after a legacy id of the
    same model (indexes made before model ids hashed the content) is used instead of a new one."""
    for model_id in (backend.model_id, *backend.legacy_model_ids):
        if os.path.isdir(os.path.join(root, model_id[:16])):
            return os.path.join(root, model_id[:16])
    return os.path.join(root, backend.model_id[:16])


@contextlib.contextmanager
def _memoised_image_tokens(backend):
    """While the demo corpus is indexed right after the demo model's first training, a torch backend
    reads the image tokens that training memoised (a frozen pretrained tower: the same weights, so
    the same tokens) instead of running the tower again; afterwards the memo's memory is freed."""
    from ..modeling.towers import release_feature_caches

    vision = getattr(getattr(backend, "model", None), "vision_stage", None)  # the torch backend's model
    if vision is not None:
        vision.enable_feature_cache()
    try:
        yield
    finally:
        if vision is not None:
            vision.disable_feature_cache()
        release_feature_caches()


def open_backend_and_index(settings: ServerSettings, progress: bool = True, echo: Callable[[str], None] = _stderr):
    """-> (backend, index). No model: the demo model; no index: the demo index for the demo model
    (filled from the demo corpus when empty), else `<home>/indexes/<model id>`."""
    from ..data import default_home
    from ..index import open_index
    from ..runtime import load_backend

    demo = settings.model is None
    model = ensure_demo_model(echo) if demo else settings.model
    backend = load_backend(settings.backend, model, settings.device, threads=settings.threads)
    if getattr(backend, "selection_reason", None):
        echo(f"backend: {backend.name} ({backend.selection_reason})")
    path = settings.index
    if path is None:
        path = str(demo_paths()[1] if demo else default_index_path(default_home() / "indexes", backend))
    try:
        index = open_index(path, backend.dim, backend.model_id, M=settings.hnsw_m,
                           ef_construction=settings.hnsw_ef_construction, ef=settings.hnsw_ef,
                           legacy_model_ids=backend.legacy_model_ids)
    except BaseException:
        backend.close()
        raise
    if demo and settings.index is None:
        from ..data import load_dataset
        from ..index import build_index

        dataset = load_dataset("demo")
        if index.count() < len(dataset.documents):  # empty, or an interrupted first build: add what is missing
            echo(f"Indexing the demo corpus into {path} ({index.count()}/{len(dataset.documents)} there; once).")
            with _memoised_image_tokens(backend):
                build_index(backend, dataset, index, batch_size=64, progress=progress, source="demo",
                            thumbnails=settings.thumbnails)
            index.flush()
    return backend, index


__all__ = ["demo_paths", "ensure_demo_model", "open_backend_and_index"]
