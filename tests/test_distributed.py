"""Data-parallel training and sharded encoding with 2 real gloo processes on the CPU (tiny preset).

One 2-process job (`two_process_job`, forked once per module, 1 thread each) runs every scenario
in turn and saves what it saw; the tests compare that with one process doing the same here:
  - training: the loss and gradients of one step, the next full step and the step after it,
    with the text tower frozen (its state cache on) too;
  - `evaluate(sharded=True)`;
  - a sharded index build that resumes an index already holding some documents;
  - a sharded build whose second process dies half-way (the last scenario).
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import socket
import traceback

import numpy as np
import pytest
import torch

from mimic_engine import distributed
from mimic_engine.preprocess import Item
from tests.test_index_build import small_dataset
from tests.test_training import synthetic_dataset

pytest.importorskip("hnswlib")

WORLD = 2
JOB_TIMEOUT_S = 120
DIES_AFTER_CALLS = 1  # the dying process's encoder answers this many calls, then its process exits
TRAIN = dict(preset="tiny", data="jsonl", batch_size=8, grad_accum=2, mixin=1.0, caption_dropout=0.5, device="cpu",
             steps=10, eval_every=100, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without_dropout(model) -> None:
    """Dropout draws differ between one batch and two halves of it by construction: switch it off
    (nn.Dropout modules, and the attention dropout rates HF attention modules keep as floats)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0


def _trainer(out: str, **options):
    from mimic_engine.training.loop import Trainer
    from mimic_engine.training.options import TrainOptions

    trainer = Trainer(TrainOptions(**{**TRAIN, "out": out, **options}))
    _without_dropout(trainer.model)
    return trainer


def _gradients(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def training_record(out: str, **options) -> dict:
    """Step 1's loss and gradients (no update), step 2 as `train_step` runs it, step 3's loss."""
    trainer = _trainer(out, **options)
    totals1, stats1 = trainer.compute_gradients()
    grads1 = _gradients(trainer.model)
    trainer.optimizer.zero_grad(set_to_none=True)
    step2 = trainer.train_step()
    totals3, _ = trainer.compute_gradients()
    return {"loss1": totals1["loss"], "acc1": totals1["acc"], "stats1": stats1, "grads1": grads1, "step2": step2,
            "loss3": totals3["loss"]}


class DyingEncoder:
    """An encoder whose process exits (as if killed) after `calls` encode calls."""

    def __init__(self, encoder, calls: int):
        self.encoder, self.calls = encoder, calls
        self.model_id, self.dim, self.legacy_model_ids = encoder.model_id, encoder.dim, encoder.legacy_model_ids

    def encode(self, items, role="document", batch_size=64):
        if self.calls == 0:
            os._exit(3)
        self.calls -= 1
        return self.encoder.encode(items, role=role, batch_size=batch_size)


def _job(rank: int, port: int, paths: dict, data: dict) -> None:
    """One process of the job: every scenario in turn; what it saw goes to paths['record'] % rank."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", MIMIC_DIST_TIMEOUT_MINUTES="1")
    torch.set_num_threads(1)
    record: dict = {}
    try:
        import mimic_engine.data as data_mod
        from mimic_engine.encoder import MimicEncoder
        from mimic_engine.evaluate import evaluate
        from mimic_engine.index import DocumentIndex, build_index

        data_mod.load_dataset = lambda kind, data_dir=None, **kw: data["train"]
        assert distributed.init_from_env("cpu") == "cpu" and distributed.world_size() == WORLD
        record["full"] = training_record(paths["train_out"])
        record["frozen_text"] = training_record(paths["train_out"], freeze=("text",))

        encoder = MimicEncoder.from_checkpoint(paths["checkpoint"])
        record["eval"] = evaluate(encoder, data["train"], "dev", batch_size=4, sharded=True)

        def sharded_build(path, enc, chunk):
            index = DocumentIndex(path, dim=encoder.dim, model_id=encoder.model_id) if rank == 0 else None
            try:
                return build_index(enc, data["corpus"], index, batch_size=2, progress=False, chunk=chunk)
            finally:
                if index is not None:
                    index.close()

        record["added"] = sharded_build(paths["resumed_index"], encoder, chunk=3)
        torch.save(record, paths["record"] % rank)  # process 1 does not come back from the last scenario
        distributed.barrier()
        try:
            sharded_build(paths["broken_index"], DyingEncoder(encoder, DIES_AFTER_CALLS) if rank == 1 else encoder,
                          chunk=2)
        except distributed.DistributedError as exc:
            record["broken"] = str(exc)
    except BaseException:
        record["error"] = traceback.format_exc()
    torch.save(record, paths["record"] % rank)


@pytest.fixture(scope="module")
def two_process_job(tmp_path_factory, tiny_encoders):
    from mimic_engine.checkpoint import save_checkpoint
    from mimic_engine.encoder import MimicEncoder
    from mimic_engine.index import DocumentIndex, build_index

    root = tmp_path_factory.mktemp("two-processes")
    paths = {"train_out": str(root / "train"), "checkpoint": str(root / "ckpt.pt"), "record": str(root / "rank%d.pt"),
             "resumed_index": str(root / "resumed"), "broken_index": str(root / "broken")}
    tiny = tiny_encoders("decoder")
    save_checkpoint(paths["checkpoint"], tiny.model, tiny.tokenizer, {"step": 0})
    enc = MimicEncoder.from_checkpoint(paths["checkpoint"])  # the encoder every process of the job loads
    data = {"train": synthetic_dataset(), "corpus": small_dataset(n_text=12, n_image=9)}
    already = dataclasses.replace(data["corpus"], documents=data["corpus"].documents[5:9])  # resume skips these
    with DocumentIndex(paths["resumed_index"], dim=enc.dim, model_id=enc.model_id) as idx:
        build_index(enc, already, idx, progress=False)

    ctx = multiprocessing.get_context("fork")  # torch is imported already: no second import per process
    port = _free_port()
    procs = [ctx.Process(target=_job, args=(rank, port, paths, data)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOB_TIMEOUT_S)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail(f"a process of the 2-process job did not finish within {JOB_TIMEOUT_S} s")
    assert procs[1].exitcode == 3, "the second process should have died in the last scenario"
    records = [torch.load(paths["record"] % r, weights_only=False) if os.path.exists(paths["record"] % r) else {}
               for r in range(WORLD)]
    for rank, record in enumerate(records):
        assert "error" not in record, f"process {rank}: {record['error']}"
    return {"records": records, "paths": paths, "data": data, "root": root, "encoder": enc}


def test_helpers_are_the_single_process_identity_without_torchrun():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.init_from_env("cpu") == "cpu"
    x = torch.randn(3, 2)
    assert distributed.gather_with_grad(x) is x and distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.shard_range(7) == range(7) and distributed.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    shares = [distributed.shard_range(7, r, 3) for r in range(3)]
    assert shares == [range(0, 3), range(3, 5), range(5, 7)]
    assert [distributed.shard_range(1, r, 2) for r in range(2)] == [range(0, 1), range(1, 1)]


@pytest.mark.parametrize("scenario,options", [("full", {}), ("frozen_text", {"freeze": ("text",)})])
def test_a_two_process_step_equals_a_one_process_step_on_the_same_global_batch(two_process_job, tmp_path, monkeypatch,
                                                                               scenario, options):
    import mimic_engine.data as data_mod

    monkeypatch.setattr(data_mod, "load_dataset", lambda kind, data_dir=None, **kw: two_process_job["data"]["train"],
                        raising=False)
    one = training_record(str(tmp_path), **options)
    assert set(one["grads1"]) and (scenario == "full") == any(n.startswith("fusion_stage.text.") for n in one["grads1"])
    for rank, record in enumerate(two_process_job["records"]):
        two = record[scenario]
        assert two["loss1"] == pytest.approx(one["loss1"], abs=1e-5), f"rank {rank}"
        assert two["acc1"] == pytest.approx(one["acc1"], abs=1e-6)
        assert two["stats1"] == one["stats1"]  # the same caption and mix-in coins
        assert set(two["grads1"]) == set(one["grads1"])
        for name, grad in one["grads1"].items():
            torch.testing.assert_close(two["grads1"][name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        for key in ("loss", "acc", "grad_norm", "scale"):
            assert two["step2"][key] == pytest.approx(one["step2"][key], rel=1e-5, abs=1e-5), key
        assert two["loss3"] == pytest.approx(one["loss3"], abs=1e-5)  # after an update: still the same model


def test_sharded_evaluation_scores_on_rank_zero_like_one_process(two_process_job):
    from mimic_engine.evaluate import evaluate

    first, second = two_process_job["records"]
    assert second["eval"] is None  # rank 1 encodes, rank 0 scores
    one = evaluate(two_process_job["encoder"], two_process_job["data"]["train"], "dev", batch_size=4)
    assert first["eval"]["n_documents"] == one["n_documents"] and first["eval"]["n_queries"] == one["n_queries"]
    for rate, groups in one["results"].items():
        for group, metrics in groups.items():
            for metric, value in metrics.items():
                assert first["eval"]["results"][rate][group][metric] == pytest.approx(value, abs=1e-6)


def test_a_sharded_build_resumes_and_gives_the_one_process_index(two_process_job):
    from mimic_engine.index import DocumentIndex, build_index

    enc = two_process_job["encoder"]
    corpus, paths = two_process_job["data"]["corpus"], two_process_job["paths"]
    first, second = two_process_job["records"]
    assert first["added"] == second["added"] == len(corpus.documents) - 4  # 4 were stored before
    reference = str(two_process_job["root"] / "one-process")
    with DocumentIndex(reference, dim=enc.dim, model_id=enc.model_id) as ref, \
            DocumentIndex(paths["resumed_index"], dim=enc.dim, model_id=enc.model_id) as sharded:
        build_index(enc, corpus, ref, batch_size=2, progress=False)
        assert sharded.count() == ref.count() == len(corpus.documents)
        for doc in corpus.documents:
            np.testing.assert_allclose(sharded.get_vector(doc.id), ref.get_vector(doc.id), atol=1e-5)
            assert sharded.get(doc.id) == ref.get(doc.id)
        queries = enc.encode([Item(text=f"topic {k}") for k in range(3)] + [Item(text="a caption 4")], role="query")
        for q in queries:
            assert [d.id for d, _ in sharded.search(q, k=10)] == [d.id for d, _ in ref.search(q, k=10)]


def test_a_process_dying_mid_build_fails_the_run_clearly_and_the_index_resumes(two_process_job):
    from mimic_engine.index import DocumentIndex, build_index

    enc = two_process_job["encoder"]
    corpus, paths = two_process_job["data"]["corpus"], two_process_job["paths"]
    message = two_process_job["records"][0].get("broken")
    assert message and "another process of this job has stopped" in message and "run the same command again" in message
    with DocumentIndex(paths["broken_index"], dim=enc.dim, model_id=enc.model_id) as idx:
        stored = idx.count()
        assert f"holds the {stored} documents" in message
        # process 1 answered one call (1 batch of a 4-document round): the first round was stored, no later one
        assert stored == 4
        assert build_index(enc, corpus, idx, batch_size=2, progress=False) == len(corpus.documents) - stored
        assert idx.count() == len(corpus.documents)
