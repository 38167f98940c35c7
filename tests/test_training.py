import dataclasses
import json
import os
import random

import numpy as np
import pytest
import torch

import click
from click.testing import CliRunner

from mimic_engine.config import TrainingStrategy
from mimic_engine.data.types import DictImageStore, Document, Query, RetrievalDataset
from mimic_engine.errors import ConfigError
from mimic_engine.training.cli import parse_options
from mimic_engine.training.losses import contrastive_loss
from mimic_engine.training.options import PRESET_DEFAULTS, TrainOptions, resolve_options
from mimic_engine.training.sampling import QueryStream, make_batch
from tests.conftest import make_image_bytes


def synthetic_dataset(n_img=12, n_txt=12) -> RetrievalDataset:
    images = {f"i{k}": make_image_bytes(k, (16, 16)) for k in range(n_img)}
    docs = [Document(f"img{k}", "image", text=f"a picture of thing {k % 4}", image_ids=[f"i{k}"]) for k in range(n_img)]
    docs += [Document(f"txt{k}", "text", text=f"fact number {k} about things") for k in range(n_txt)]
    queries = {}
    for split, ks in (("train", range(0, 8)), ("dev", range(8, 10)), ("test", range(10, 12))):
        qs = []
        for k in ks:
            qs.append(Query(f"{split}-qi{k}", f"show thing {k % 4}", positives=[f"img{j}" for j in range(n_img) if j % 4 == k % 4]))
            qs.append(Query(f"{split}-qt{k}", f"what is fact {k}?", positives=[f"txt{k}"],
                            hard_negatives=[f"txt{(k + 1) % n_txt}", f"img{(k + 1) % n_img}"]))
        queries[split] = qs
    return RetrievalDataset("synthetic", docs, queries, DictImageStore(images))


def settings(p=0.0, mixin=0.0):
    return TrainingStrategy(caption_dropout=p, caption_dropout_queries=True, mixin=mixin)


def test_caption_dropout_changes_batches_and_is_seeded():
    ds = synthetic_dataset()
    queries = [q for q in ds.split("train") if "qi" in q.id]

    def captions(p, seed):
        b = make_batch(queries, ds, random.Random(seed), settings(p=p))
        return [it.has_text for it in b.candidate_items], b.stats

    kept, stats0 = captions(0.0, 1)
    assert all(kept) and stats0["captions_dropped"] == 0
    dropped, stats1 = captions(1.0, 1)
    assert not any(dropped) and stats1["captions_dropped"] == len(queries)
    half_a, _ = captions(0.5, 7)
    half_b, _ = captions(0.5, 7)
    assert half_a == half_b  # seeded
    many = [captions(0.5, s)[1]["captions_dropped"] for s in range(30)]
    assert 0 < np.mean(many) < len(queries)


def test_mixin_adds_unimodal_views_with_rows_and_masks():
    ds = synthetic_dataset()
    queries = [q for q in ds.split("train") if "qi" in q.id]
    plain = make_batch(queries, ds, random.Random(0), settings(mixin=0.0))
    mixed = make_batch(queries, ds, random.Random(0), settings(mixin=2.0))
    assert len(plain.query_items) == len(queries)
    assert mixed.stats["mixin_views"] == 2 * len(queries)
    assert len(mixed.query_items) == 3 * len(queries) == len(mixed.candidate_items)
    views = mixed.candidate_items[1:3]
    assert {("image" if v.images and not v.has_text else "caption" if v.has_text and not v.images else "both") for v in views} == {"image", "caption"}
    # every row's target is allowed; the other views of the same document are masked out for that row
    for r, t in enumerate(mixed.targets):
        assert not mixed.ignore[r, t]
    assert mixed.ignore[0, 1] and mixed.ignore[0, 2] and mixed.ignore[1, 0]


def test_hard_negatives_are_modality_balanced():
    ds = synthetic_dataset()
    queries = [q for q in ds.split("train") if "qt" in q.id]
    mined = {q.id: q.hard_negatives for q in queries}
    b = make_batch(queries, ds, random.Random(0), settings(), mined)
    assert b.stats["hard_negatives"] == 2 * len(queries)
    assert len(b.candidate_items) == 3 * len(queries)


def test_loss_masks_ignored_candidates():
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    targets = torch.tensor([0, 1, 2])
    ignore = torch.zeros(3, 4, dtype=torch.bool)
    base, _ = contrastive_loss(q, c, torch.tensor(10.0), targets, ignore)
    ignore[0, 3] = True
    masked, _ = contrastive_loss(q, c, torch.tensor(10.0), targets, ignore)
    assert masked < base and torch.isfinite(masked)


def test_query_stream_covers_every_query_each_epoch():
    ds = synthetic_dataset()
    stream = QueryStream(ds.split("train"), random.Random(0))
    n = len(stream.queries)
    seen = [q.id for q in stream.take(n)]
    assert sorted(seen) == sorted(q.id for q in stream.queries)


def test_options_validate_and_merge_config_file(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"fusion": "early", "batch_size": 8, "freeze": ["vision"], "eval_every": 7}))
    opts = parse_options(["--config", str(cfg), "--batch-size", "4"])
    # the file overrides the defaults, a flag given overrides the file, a flag's default does not
    assert opts.fusion == "early" and opts.batch_size == 4 and opts.freeze == ("vision",) and opts.eval_every == 7
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "tiny"\nselect_keep = [1.0]\n')
    opts = parse_options(["--config", str(toml), "--freeze", "none", "--no-query-caption-dropout"])
    assert opts.preset == "tiny" and opts.select_keep == (1.0,) and opts.freeze == ()
    assert opts.caption_dropout_queries is False
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"bogus": 1}))
    with pytest.raises(ConfigError, match="bogus"):
        parse_options(["--config", str(bad)])
    out_of_range = tmp_path / "range.json"
    out_of_range.write_text(json.dumps({"caption_dropout": 2}))
    with pytest.raises(ConfigError, match="caption_dropout"):
        parse_options(["--config", str(out_of_range)])
    with pytest.raises(click.BadParameter, match="0.0<=x<=1.0") as exc:
        parse_options(["--caption-dropout", "2"])
    assert exc.value.param.name == "caption_dropout"
    with pytest.raises(click.BadParameter, match="caption-keep rates") as exc:
        parse_options(["--caption-keep", "1.0,x"])
    assert exc.value.param.name == "final_caption_keep"


def test_resolution_fills_preset_defaults_into_new_objects_and_the_config_strategy():
    asked = TrainOptions(preset="small", mixin=0.0, eval_every=9)
    before = asked.to_dict()
    run = resolve_options(asked)
    assert asked.to_dict() == before  # the caller's options are not touched ...
    with pytest.raises(dataclasses.FrozenInstanceError):
        asked.eval_every = 1  # ... and cannot be
    small = PRESET_DEFAULTS["small"]
    assert run.options.eval_every == 9 and run.options.patience == small["patience"]
    assert run.options.max_minutes == small["max_minutes"] and run.options.freeze == small["freeze"]
    # the strategies: the options asked for, else TrainingStrategy's defaults, in config.strategy
    assert run.config.strategy == TrainingStrategy(caption_dropout=TrainingStrategy().caption_dropout, mixin=0.0,
                                                   caption_dropout_queries=TrainingStrategy().caption_dropout_queries)
    assert (run.options.caption_dropout, run.options.mixin) == (run.config.strategy.caption_dropout, 0.0)
    assert run.config.preset == "small" and run.config.fusion.fusion == "decoder"
    assert resolve_options(run.options) == run  # resolving twice changes nothing


def test_a_checkpoint_config_with_the_old_mixin_ratio_name_still_loads():
    from mimic_engine.config import MimicConfig, preset

    old = preset("tiny").to_dict()
    old["strategy"] = {"caption_dropout": 0.3, "caption_dropout_queries": True, "mixin_ratio": 2.0}
    cfg = MimicConfig.from_dict(old)
    assert cfg.strategy.mixin == 2.0 and cfg.strategy.caption_dropout == 0.3


@pytest.mark.parametrize("fusion", ["decoder", "early", "late"])
def test_two_step_training_run_writes_a_loadable_checkpoint(fusion, tmp_path, monkeypatch):
    import mimic_engine.data as data_mod
    from mimic_engine.encoder import MimicEncoder
    from mimic_engine.training.train import main

    ds = synthetic_dataset()
    monkeypatch.setattr(data_mod, "load_dataset", lambda kind, data_dir=None, **kw: ds, raising=False)
    out = tmp_path / fusion
    ckpt = main(["--preset", "tiny", "--fusion", fusion, "--data", "jsonl", "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--eval-every", "1", "--mixin", "1.0", "--caption-dropout", "0.5", "--no-progress"])
    assert os.path.isfile(ckpt) and os.path.isfile(out / "last.pt") and os.path.isfile(out / "curves.png")
    results = json.loads((out / "results.json").read_text())
    assert set(results["test"]["results"]) == {"1.0", "0.5", "0.0"}
    enc = MimicEncoder.from_checkpoint(ckpt)
    assert enc.config.fusion.fusion == fusion and enc.config.strategy.mixin == 1.0
    meta = torch.load(ckpt, weights_only=True)["meta"]
    assert meta["train_options"]["eval_every"] == 1 and meta["train_options"]["mixin"] == 1.0
    log = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("loss" in r and np.isfinite(r["loss"]) for r in log)

    # resume continues from step 2 to 3
    ckpt2 = main(["--preset", "tiny", "--fusion", fusion, "--data", "jsonl", "--out", str(out), "--steps", "3",
                  "--batch-size", "4", "--eval-every", "1", "--mixin", "1.0", "--caption-dropout", "0.5",
                  "--resume", str(out / "last.pt"), "--no-progress"])
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 3 and os.path.isfile(ckpt2)


def test_mine_writes_modality_tagged_negatives_that_training_reads(tiny_encoders, tmp_path):
    from mimic_engine.training.loop import load_hard_negatives
    from mimic_engine.training.mining import mine

    ds = synthetic_dataset()
    rows = mine(tiny_encoders("decoder"), ds, "train", top=10)
    assert len(rows) == len(ds.split("train"))
    for row, q in zip(rows, ds.split("train")):
        assert row["qid"] == q.id and not set(row["all_negFacts"]) & set(q.positives)
        assert 10 - len(q.positives) <= len(row["all_negFacts"]) <= 10
    path = tmp_path / "mined.json"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    mined = load_hard_negatives(str(path))
    assert set(mined) == {q.id for q in ds.split("train")}


def test_freezing_the_text_tower_keeps_a_t5_decoder_trainable():
    from mimic_engine.config import preset
    from mimic_engine.modeling import build_model
    from mimic_engine.training.loop import param_groups
    cfg = preset("tiny", **{"text.kind": "t5", "text.hf_config": dict(vocab_size=30522, d_model=32, d_kv=8, d_ff=64,
                                                                       num_layers=1, num_decoder_layers=1, num_heads=4)})
    model = build_model(cfg)
    param_groups(model, resolve_options(TrainOptions(preset="tiny", freeze=["text"])).options)
    model.fusion_stage.text.enable_state_cache()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("fusion_stage.text.model.decoder.") for n in trainable)
    assert not any(n.startswith("fusion_stage.text.model.encoder.") for n in trainable)


def test_compare_and_mine_commands_on_a_tiny_model(tmp_path, monkeypatch):
    """`mimic-engine compare` (equal steps, two seeds) then `mimic-engine mine` with one of its checkpoints."""
    import mimic_engine.data as data_mod
    from mimic_engine.cli import cli

    ds = synthetic_dataset()
    monkeypatch.setattr(data_mod, "load_dataset", lambda kind, data_dir=None, **kw: ds, raising=False)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(cli, ["compare", "--preset", "tiny", "--data", "jsonl", "--variants", "late",
                                      "--seeds", "0,1", "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "compare.json").read_text())
    assert doc["budget"] == {"steps": 2, "minutes": None, "early_stopping": False} and doc["seeds"] == [0, 1]
    assert [v["key"] for v in doc["variants"]] == ["late"]
    for v in doc["variants"]:
        assert [r["seed"] for r in v["runs"]] == [0, 1] and all(r["steps"] == 2 for r in v["runs"])
        assert v["summary"]["steps"] == {"mean": 2.0, "sd": 0.0, "n": 2}
        mrr = [r["report"]["test"]["results"]["1.0"]["all"]["MRR@10"] for r in v["runs"]]
        assert v["summary"]["test"]["1.0"]["all"]["MRR@10"]["mean"] == pytest.approx(np.mean(mrr))
        assert v["summary"]["test"]["1.0"]["all"]["MRR@10"]["sd"] == pytest.approx(np.std(mrr, ddof=1))
    assert doc["variants"][0]["strategy"]["mixin"] == 0.0  # the baseline trains without the strategies
    md = (out / "compare.md").read_text()
    assert "equal steps: 2 per run" in md and "## caption-keep 0.0" in md and " ± " in md
    assert (out / "tiny" / "late" / "seed-1" / "ckpt.pt").is_file()
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the chart
    assert doc["presets"] == ["tiny"] and doc["variants"][0]["tower"] == "ViT, from scratch"
    assert not any(r["reused"] for r in doc["variants"][0]["runs"])

    # The same command again reads the finished runs back; a third seed is trained, the others reused.
    result = CliRunner().invoke(cli, ["compare", "--preset", "tiny", "--data", "jsonl", "--variants", "late",
                                      "--seeds", "0,1,2", "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    again = json.loads((out / "compare.json").read_text())
    assert [r["reused"] for r in again["variants"][0]["runs"]] == [True, True, False]
    assert again["variants"][0]["runs"][1]["report"] == doc["variants"][0]["runs"][1]["report"]
    assert again["variants"][0]["runs"][1]["steps"] == 2 and "reusing the finished run" in result.output
    # Another budget is another run: nothing is reused, and the output says why.
    result = CliRunner().invoke(cli, ["compare", "--preset", "tiny", "--data", "jsonl", "--variants", "late",
                                      "--seeds", "0", "--steps", "3", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "steps=2 (now 3)" in result.output
    assert json.loads((out / "compare.json").read_text())["variants"][0]["runs"][0]["steps"] == 3
    # --report-only trains nothing: seed 0 (now a 3-step run) and seed 5 (never run) are left out
    result = CliRunner().invoke(cli, ["compare", "--preset", "tiny", "--data", "jsonl", "--variants", "late",
                                      "--seeds", "0,1,2,5", "--steps", "2", "--device", "cpu", "--out", str(out),
                                      "--report-only"])
    assert result.exit_code == 0, result.output
    assert "training (" not in result.output and "left out" in result.output
    assert [r["seed"] for r in json.loads((out / "compare.json").read_text())["variants"][0]["runs"]] == [1, 2]

    mined = tmp_path / "mined.json"
    result = CliRunner().invoke(cli, ["mine", "--model", str(out / "tiny" / "late" / "seed-0" / "ckpt.pt"), "--data", "jsonl",
                                      "--top", "5", "--device", "cpu", "--out", str(mined)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in mined.read_text().splitlines()]
    assert [r["qid"] for r in rows] == [q.id for q in ds.split("train")]


def test_compare_budgets_equal_steps_or_equal_time():
    from mimic_engine.training.comparison import UNBOUNDED_STEPS, VARIANTS, run_options

    base = TrainOptions(preset="tiny")
    steps = run_options(base, VARIANTS["late"], 2, "runs/x", steps=50, minutes=None)
    assert (steps.steps, steps.max_minutes, steps.patience, steps.seed) == (50, 0.0, 0, 2)
    assert (steps.fusion, steps.caption_dropout, steps.mixin) == ("late", 0.0, 0.0)
    assert steps.out == os.path.join("runs/x", "late", "seed-2")
    timed = run_options(base, VARIANTS["mimic"], 0, "runs/x", steps=None, minutes=1.5)
    assert (timed.steps, timed.max_minutes, timed.patience) == (UNBOUNDED_STEPS, 1.5, 0)
    assert timed.caption_dropout is None  # MiMIC keeps its default strategies
    assert base == TrainOptions(preset="tiny")


def test_compare_tables_render_every_metric_group_present():
    from mimic_engine.training.comparison import render_markdown, summarise

    def report(mrr, extra):
        groups = {"all": {"MRR@10": mrr, "NDCG@10": mrr + 1}, "image": None, "conjunctive": {"MRR@10": extra}}
        return {"test": {"results": {"1.0": groups}},
                "diagnostics": {"n_items": 4, "modality_collapse": {"collapse_ratio": mrr / 10}}}

    runs = [{"steps": 5, "best_step": 5, "minutes": 0.1, "report": report(50.0, 10.0)},
            {"steps": 5, "best_step": 4, "minutes": 0.2, "report": report(60.0, 30.0)}]
    summary = summarise(runs)
    assert summary["test"]["1.0"]["conjunctive"]["MRR@10"] == {"mean": 20.0, "sd": pytest.approx(14.1421356), "n": 2}
    doc = {"preset": "tiny", "data": "jsonl", "seeds": [0, 1], "budget": {"steps": 5, "minutes": None},
           "variants": [{"key": "m", "name": "M", "fusion": "decoder", "strategy": {"caption_dropout": 0.5, "mixin": 1.0},
                         "runs": runs, "summary": summary}]}
    md = render_markdown(doc)
    assert "| conjunctive | M | 20.00 ± 14.14 | - |" in md
    assert "| all | M | 55.00 ± 7.07 | 56.00 ± 7.07 |" in md and "| image | M | - | - |" in md
    assert "collapse ratio" in md and "5.5000 ± 0.7071" in md


def test_compare_kind_table_has_a_row_per_preset_and_variant():
    from mimic_engine.training.comparison import render_markdown, summarise

    def run(ndcg, shift):
        groups = {"all": {"NDCG@10": ndcg}, "kind:pixel-only": {"NDCG@10": ndcg - 10, "MRR@10": ndcg - 5}}
        return {"steps": 3, "best_step": 3, "minutes": 0.1, "reused": False,
                "report": {"test": {"results": {"1.0": groups, "0.0": groups}},
                           "diagnostics": {"modality_collapse": {"same_caption_image_swap_shift": shift,
                                                                 "collapse_ratio": 2.0}}}}

    variants = [{"key": "mimic", "name": "M", "preset": preset, "tower": tower, "fusion": "decoder",
                 "strategy": {}, "runs": runs, "summary": summarise(runs)}
                for preset, tower, runs in (("small", "ViT, from scratch", [run(90.0, 0.03), run(80.0, 0.05)]),
                                            ("small-effnet", "EfficientNet-Lite0, pretrained, frozen", [run(99.0, 0.04)]))]
    doc = {"presets": ["small", "small-effnet"], "data": "demo", "seeds": [0, 1], "budget": {"steps": 3},
           "variants": variants}
    md = render_markdown(doc)
    assert "## NDCG@10 per query kind and caption-keep rate" in md
    assert "| tower | variant | pixel-only 1.0 | pixel-only 0.0 | same-caption shift | collapse ratio | seeds |" in md
    assert "| ViT, from scratch | M (small) | 75.0 ± 7.1 | 75.0 ± 7.1 | 0.0400 ± 0.0141 | 2.00 ± 0.00 | 2 |" in md
    assert "| EfficientNet-Lite0, pretrained, frozen | M (small-effnet) | 89.0 | 89.0 | 0.0400 | 2.00 | 1 |" in md
