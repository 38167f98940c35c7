"""The training loop: AdamW, warm-up + cosine schedule, gradient clipping and accumulation, autocast on
CUDA, periodic dev evaluation with early stopping on MRR@10, best checkpoint, resume, fixed seeds,
a progress bar, a JSONL metrics log and a PNG of the curves.

Outputs in `out/`: ckpt.pt (best dev MRR@10), last.pt (resume state), metrics.jsonl, curves.png,
results.json (final dev and test metrics at every caption-keep rate, plus diagnostics).

Data-parallel under torchrun (mimic_engine/distributed.py): `batch_size` stays the global batch.
Every process draws the whole step's queries and coins from the same seeded stream and encodes its
contiguous share; the candidate embeddings are all-gathered with gradients, so each process's rows
are scored against the candidates of the whole batch (the loss is query -> candidate only, so the
queries need not travel: the union of the processes' rows is the whole batch's rows), and the
gradients are summed over the processes: one step equals a one-process step on the same batch.
Rank 0 alone evaluates, selects and writes files while the others wait for its decision. The
sampling state does not depend on the number of processes, so `--resume` continues a run with the
same or another number of processes.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import time

import numpy as np
import torch

from mimic_engine import distributed
from mimic_engine.checkpoint import save_checkpoint, update_checkpoint_meta
from mimic_engine.encoder import MimicEncoder
from mimic_engine.errors import CheckpointError, ConfigError, DataError
from mimic_engine.modeling import build_model
from mimic_engine.preprocess import load_tokenizer

from .losses import contrastive_loss
from .options import ResolvedTraining, TrainOptions, resolve_options
from .sampling import QueryStream, make_batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def param_groups(model, opts: TrainOptions):
    """Pretrained weights get `lr`, weights trained from scratch get `lr_new`; no decay on biases/norms/scale.
    `opts` are resolved options (`resolve_options(...).options`: `freeze` decided)."""
    cfg = model.config
    pretrained_prefixes = []
    if cfg.text.pretrained and not cfg.random_init:
        pretrained_prefixes.append("fusion_stage.text.")
    if cfg.vision.pretrained and not cfg.random_init:
        pretrained_prefixes.append("vision_stage.model.")
    # --freeze text freezes the text *encoder*; a T5 backbone's own decoder is the fusion decoder and trains
    text_frozen = (("fusion_stage.text.model.encoder.", "fusion_stage.text.model.shared.") if cfg.text.kind == "t5"
                   else ("fusion_stage.text.",))
    frozen_prefixes = {"text": text_frozen, "vision": ("vision_stage.model.",)}
    groups = {}
    for name, p in model.named_parameters():
        if any(name.startswith(frozen_prefixes[f]) for f in opts.freeze):
            p.requires_grad_(False)
            continue
        pretrained = any(name.startswith(pfx) for pfx in pretrained_prefixes)
        no_decay = p.ndim < 2 or name == "logit_scale"
        key = (pretrained, no_decay)
        groups.setdefault(key, []).append(p)
    return [
        {"params": ps, "lr": opts.lr if pre else opts.lr_new, "base_lr": opts.lr if pre else opts.lr_new,
         "weight_decay": 0.0 if nd else opts.weight_decay}
        for (pre, nd), ps in groups.items()
    ]


def lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` fraction, then cosine to 0. `progress` in [0, 1]."""
    if warmup > 0 and progress < warmup:
        return max(progress / warmup, 1e-3)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / max(1e-8, 1.0 - warmup))))


def load_hard_negatives(path: str | None) -> dict | None:
    if not path:
        return None
    out = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[str(row["qid"])] = [str(d) for d in row["all_negFacts"]]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{n}: expected a JSON line with 'qid' and 'all_negFacts' ({exc})") from exc
    return out


class Trainer:
    """Trains the model of `run.config` with the resolved options `run.options` (see training/options.py).
    Given plain TrainOptions, it resolves them first (into new objects; the caller's stay as they are)."""

    def __init__(self, run: ResolvedTraining | TrainOptions):
        if isinstance(run, TrainOptions):
            run = resolve_options(run)
        self.run = run
        self.opts = opts = run.options
        self.config = run.config
        self.device = torch.device(distributed.init_from_env(opts.device))  # one process: resolve_device
        self.world_size, self.is_main = distributed.world_size(), distributed.is_main()
        if opts.batch_size < self.world_size:
            raise ConfigError(f"batch_size={opts.batch_size} is the global batch, shared by the {self.world_size} "
                              f"processes; pass --batch-size {self.world_size} or more")
        seed_everything(opts.seed)
        from mimic_engine.data import load_dataset

        self.dataset = load_dataset(opts.data, opts.data_dir)
        self.model = build_model(self.config).to(self.device)
        self.tokenizer = load_tokenizer(self.config)
        self.encoder = MimicEncoder(self.model, self.tokenizer, self.device)
        self.hard_negatives = load_hard_negatives(opts.hard_negatives)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, opts))
        if "text" in opts.freeze and opts.fusion != "early":
            # frozen text tower whose input is token ids only: encode each distinct text once per run
            self.model.fusion_stage.text.enable_state_cache()
        if "vision" in opts.freeze:  # frozen image tower: encode each distinct image once per run
            self.model.vision_stage.enable_feature_cache()
        self.rng = random.Random(opts.seed)
        self.stream = QueryStream(self.dataset.split("train"), self.rng)
        if not self.stream.queries:
            raise ConfigError(f"the {opts.data!r} data has no training queries with positives")
        use_amp = opts.amp and self.device.type == "cuda"
        self.amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if use_amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.step = 0
        self.best = -1.0
        self.best_step = 0
        self.evals_without_gain = 0
        self.elapsed = 0.0
        self.stop_reason = None  # set by fit(): "steps", "time budget" or "early stopping"
        os.makedirs(opts.out, exist_ok=True)
        self.log_path = os.path.join(opts.out, "metrics.jsonl")
        if opts.resume:
            self._resume(opts.resume)
        elif os.path.exists(self.log_path) and self.is_main:
            os.remove(self.log_path)
        if self.world_size > 1:
            distributed.broadcast_module(self.model)  # the same start everywhere, as DistributedDataParallel
            # dropout: another stream per process, reproducible from (seed, rank, step)
            torch.manual_seed(int(np.random.SeedSequence([opts.seed, distributed.rank(), self.step]).generate_state(1)[0]))

    # ---- persistence ------------------------------------------------------------------------------
    def meta(self, **extra) -> dict:
        if self.world_size > 1:
            extra = {"processes": self.world_size, **extra}
        return {"step": self.step, "seed": self.opts.seed, "commit": git_commit(), "data": self.opts.data,
                "train_options": self.opts.to_dict(), "best_dev_select_mrr10": self.best,
                "select_keep": list(self.opts.select_keep), **extra}

    def _save_last(self) -> None:
        state = {
            "format": "mimic-engine-train-state", "format_version": 1,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "step": self.step, "best": self.best, "best_step": self.best_step,
            "evals_without_gain": self.evals_without_gain, "elapsed": self.elapsed,
            "rng_python": self.rng.getstate(), "rng_torch": torch.get_rng_state(), "stream": self.stream.state(),
            "config": self.config.to_dict(), "train_options": self.opts.to_dict(),
        }
        path = os.path.join(self.opts.out, "last.pt")
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)

    def _resume(self, path: str) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot resume from {path!r}: {exc.__class__.__name__}: {exc}") from exc
        if not isinstance(state, dict) or state.get("format") != "mimic-engine-train-state":
            raise CheckpointError(f"{path!r} is not a training state (expected OUT/last.pt of an earlier run)")
        if state["config"]["fusion"]["fusion"] != self.config.fusion.fusion or state["config"]["preset"] != self.config.preset:
            raise CheckpointError(f"{path!r} was trained with preset={state['config']['preset']} "
                                  f"fusion={state['config']['fusion']['fusion']}; pass the same --preset/--fusion")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.best, self.best_step = state["step"], state["best"], state["best_step"]
        self.evals_without_gain, self.elapsed = state["evals_without_gain"], state["elapsed"]
        rs = state["rng_python"]
        self.rng.setstate((rs[0], tuple(rs[1]), rs[2]))
        torch.set_rng_state(state["rng_torch"])
        self.stream.load_state(state["stream"])

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    # ---- one optimisation step -------------------------------------------------------------------
    def compute_gradients(self) -> tuple[dict, dict]:
        """Forward and backward passes of one step (its `grad_accum` batches); under torchrun the
        gradients are then summed over the processes. -> ({"loss", "acc"} of the step, the batch
        stats summed over its batches), both of the whole global batch."""
        self.model.train()
        opts = self.opts
        totals = {"loss": 0.0, "acc": 0.0}
        stats_sum: dict = {}
        for _ in range(opts.grad_accum):
            queries = self.stream.take(opts.batch_size)
            share = distributed.shard_range(len(queries)) if self.world_size > 1 else None
            batch = make_batch(queries, self.dataset, self.rng, self.config.strategy, self.hard_negatives, share)
            if self.world_size > 1 and not batch.query_items:
                raise DataError(f"process {distributed.rank()} drew no training query with a positive in the corpus; "
                                f"use a larger --batch-size")
            pre = self.encoder.preprocessor
            q_in = pre.collate(batch.query_items).to(self.device)
            c_in = pre.collate(batch.candidate_items).to(self.device)
            targets = torch.tensor(batch.targets, device=self.device)
            ignore = torch.from_numpy(batch.ignore).to(self.device)
            with torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                q = self.model.encode_queries(q_in)
                c = self.model.encode_documents(c_in)
            if self.world_size > 1:  # this process's rows against the candidates of every process
                loss, info = contrastive_loss(q, distributed.gather_with_grad(c), self.model.scale(), targets, ignore,
                                              total_rows=batch.total_rows)
            else:
                loss, info = contrastive_loss(q, c, self.model.scale(), targets, ignore)
            loss = loss / opts.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            step_loss, step_acc = distributed.all_reduce_sum([float(loss.detach()), info["acc"]])
            totals["loss"] += step_loss
            totals["acc"] += step_acc / opts.grad_accum
            for k, v in batch.stats.items():
                stats_sum[k] = stats_sum.get(k, 0) + v
        distributed.all_reduce_gradients(self.model.parameters())
        return totals, stats_sum

    def train_step(self) -> dict:
        opts = self.opts
        totals, stats_sum = self.compute_gradients()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], opts.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {**totals, "grad_norm": float(grad_norm), "scale": float(self.model.scale().detach()), **stats_sum}

    def progress(self) -> float:
        by_steps = self.step / self.opts.steps
        by_time = self.elapsed / (60.0 * self.opts.max_minutes) if self.opts.max_minutes else 0.0
        return min(1.0, max(by_steps, by_time))

    def set_lr(self) -> float:
        f = lr_factor(self.progress(), self.opts.warmup)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        return f

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluate(self, split: str, caption_keep, diagnostics: bool = False) -> dict:
        from mimic_engine.evaluate import evaluate
        from mimic_engine.evaluate import diagnostics as run_diagnostics

        self.model.eval()
        res = evaluate(self.encoder, self.dataset, split, caption_keep=tuple(caption_keep), seed=self.opts.seed,
                       batch_size=self.opts.eval_batch_size, max_queries=self.opts.eval_max_queries)
        if diagnostics:
            res["diagnostics"] = run_diagnostics(self.encoder, self.dataset, seed=self.opts.seed)
        self.model.train()
        return res

    def maybe_evaluate(self) -> bool:
        """Dev MRR@10, averaged over `select_keep` rates; saves ckpt.pt on improvement. True = stop early.
        Under torchrun rank 0 evaluates and decides; the other processes wait for its decision."""
        stop = self._evaluate_and_select() if self.is_main else None
        if self.world_size > 1:
            self.best, self.best_step, self.evals_without_gain, stop = distributed.broadcast_object(
                (self.best, self.best_step, self.evals_without_gain, stop))
        return stop

    def _evaluate_and_select(self) -> bool:
        res = self.evaluate("dev", self.opts.select_keep)
        mrr = float(np.mean([r["all"]["MRR@10"] for r in res["results"].values()]))
        improved = mrr > self.best
        if improved:
            self.best, self.best_step, self.evals_without_gain = mrr, self.step, 0
            save_checkpoint(os.path.join(self.opts.out, "ckpt.pt"), self.model, self.tokenizer,
                            self.meta(metrics={"dev": res["results"]}))
        else:
            self.evals_without_gain += 1
        self.log({"step": self.step, "elapsed_s": round(self.elapsed, 2), "dev": res["results"], "select": mrr,
                  "best": self.best})
        self._save_last()
        return self.opts.patience > 0 and self.evals_without_gain >= self.opts.patience

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> str:
        from tqdm import tqdm

        opts = self.opts
        bar = tqdm(total=opts.steps, initial=self.step, disable=not opts.progress or not self.is_main,
                   desc=f"train {opts.fusion}", dynamic_ncols=True)
        if self.world_size > 1:
            self.log({"event": "started", "step": self.step, "processes": self.world_size,
                      "global_batch": opts.batch_size})
        stop_reason = "steps"
        while self.step < opts.steps:
            if self.world_size > 1:  # rank 0's clock: the time budget and the schedule agree everywhere
                self.elapsed = distributed.broadcast_object(self.elapsed)
            if opts.max_minutes and self.elapsed >= 60.0 * opts.max_minutes:
                stop_reason = "time budget"
                break
            t0 = time.perf_counter()  # the budget counts evaluation time too
            lr_f = self.set_lr()
            info = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{info['loss']:.3f}", acc=f"{info['acc']:.2f}", lr=f"{lr_f:.2f}")
            if self.step % 10 == 0 or self.step == 1:
                self.log({"step": self.step, "elapsed_s": round(self.elapsed, 2), "lr_factor": lr_f, **info})
            stop = self.step % opts.eval_every == 0 and self.maybe_evaluate()
            self.elapsed += time.perf_counter() - t0
            if stop:
                stop_reason = "early stopping"
                break
        bar.close()
        if self.step % opts.eval_every != 0 and stop_reason != "early stopping":
            self.maybe_evaluate()  # the last steps since the previous evaluation
        self.stop_reason = stop_reason
        self.log({"event": "stopped", "reason": stop_reason, "step": self.step, "best_step": self.best_step,
                  "elapsed_s": round(self.elapsed, 2)})
        return os.path.join(opts.out, "ckpt.pt")


def final_report(ckpt_path: str, opts: TrainOptions, dataset=None) -> dict:
    """Evaluate the best checkpoint on dev and test at every caption-keep rate, with diagnostics.
    `opts`: the run's (resolved) options. Under torchrun every process calls this: they share the
    encoding, rank 0 scores and updates the checkpoint, and every process returns the report."""
    from mimic_engine.evaluate import diagnostics, evaluate

    encoder = MimicEncoder.from_checkpoint(ckpt_path, distributed.init_from_env(opts.device))
    # fixed weights: each image and each text through its tower once over all the passes below (the
    # image memo is the one the run's dev evaluations filled, when its tower was frozen)
    encoder.model.vision_stage.enable_feature_cache()
    if opts.fusion != "early":  # early fusion's text tower reads visual tokens too: nothing to memoise
        encoder.model.fusion_stage.text.enable_state_cache()
    if dataset is None:
        from mimic_engine.data import load_dataset

        dataset = load_dataset(opts.data, opts.data_dir)
    report = {"checkpoint": ckpt_path, "fusion": opts.fusion, "preset": opts.preset}
    corpus = {}  # dev and test are scored against one encoding of the corpus
    for split in ("dev", "test"):
        if split in dataset.queries and dataset.queries[split]:
            report[split] = evaluate(encoder, dataset, split, caption_keep=tuple(opts.final_caption_keep),
                                     seed=opts.seed, batch_size=opts.eval_batch_size, sharded=True,
                                     corpus_memo=corpus)
    report["diagnostics"] = diagnostics(encoder, dataset, seed=opts.seed, sharded=True)
    if distributed.is_main():
        update_checkpoint_meta(ckpt_path, {"final_metrics": {s: report[s]["results"] for s in ("dev", "test")
                                                             if s in report}})
    return distributed.broadcast_object(report)
