"""ONNX Runtime variants vs eager PyTorch on this machine, side by side.

    python -m mimic_engine.export.speed EXPORT_DIR [--batches 1,64] [--repeats 15] [--json out.json]

Workload: items with 16-32 text tokens, every second item with one image; batches are collated
once, so the timings are the model (vision graph, gather, fusion graph), not tokenising or image
decoding. Backends run round-robin, one call each per round, so load from other processes on a
shared machine hits all of them alike (ONNX Runtime's worker threads do not spin, so they do not
steal the cores from the backend timed next); the table gives the median per batch, items/s, the ratio
to PyTorch and each variant's min cosine to PyTorch on the timed batches.

Threads: both runtimes get the same intra-op thread count (default 1). On a machine whose cores
are busy with other work, PyTorch's OpenMP threads degrade badly when oversubscribed (measured here:
batch 64 took 0.55 s with 1 thread and 1.5-2.2 s with 2 on 2 shared cores), which would flatter
ONNX Runtime; pass --threads N on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

WORDS = ("red bus street city river bridge bird cat dog tree house mountain lake boat train station market "
         "garden flower museum tower church castle beach forest road car bicycle painting statue window").split()


def workload(preprocessor, batch_size: int, seed: int = 0):
    """One collated batch: 16-32 tokens of text per item, one image on every second item."""
    from PIL import Image

    from mimic_engine.preprocess import Item

    rng = np.random.default_rng(seed)
    s = preprocessor.config.vision.image_size
    items = []
    for i in range(batch_size):
        n_words = int(rng.integers(14, 30))  # ~16-32 tokens with [CLS]/[SEP]
        text = " ".join(rng.choice(WORDS, n_words))
        images = [Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8))] if i % 2 else []
        items.append(Item(text=text, images=images))
    return preprocessor.collate(items)


def compare(export_dir: str, checkpoint: str | None = None, batches=(1, 64), repeats: int = 15,
            variants=("fp32", "optimized", "int8", "fp16"), threads: int = 1, log=print) -> list[dict]:
    from mimic_engine.runtime.export_format import read_manifest
    from mimic_engine.runtime.onnx_backend import OnnxBackend
    from mimic_engine.runtime.torch_backend import TorchBackend

    manifest = read_manifest(export_dir)
    torch.set_num_threads(threads)
    backends = {"torch fp32": TorchBackend.from_checkpoint(checkpoint or manifest.checkpoint)}
    for v in variants:
        if v in manifest.variants:
            # no spinning: idle ORT workers would otherwise busy-wait and slow the next backend down
            backends[f"onnx {v}"] = OnnxBackend(export_dir, variant=v, threads=threads, spin=False)
    rows = []
    for b in batches:
        batch = workload(backends["torch fp32"].preprocessor, b)
        outputs = {name: be.encode_batch(batch) for name, be in backends.items()}  # warm-up + parity
        times = {name: [] for name in backends}
        for _ in range(repeats):
            for name, be in backends.items():
                start = time.perf_counter()
                be.encode_batch(batch)
                times[name].append(time.perf_counter() - start)
        base = float(np.median(times["torch fp32"]))
        ref = outputs["torch fp32"]
        for name, ts in times.items():
            med = float(np.median(ts))
            cos = float(((outputs[name] * ref).sum(1)).min())
            rows.append({"batch": b, "backend": name, "median_ms": med * 1e3, "items_per_s": b / med,
                         "speedup_vs_torch": base / med, "min_cos_vs_torch": cos, "threads": threads})
    log(format_rows(rows))
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'batch':>5} {'backend':<16} {'median ms':>10} {'items/s':>9} {'vs torch':>9} {'min cos':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['backend']:<16} {r['median_ms']:>10.2f} {r['items_per_s']:>9.1f} "
                     f"{r['speedup_vs_torch']:>8.2f}x {r['min_cos_vs_torch']:>10.6f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("--checkpoint", default=None, help="ckpt.pt for the PyTorch baseline [default: the manifest's]")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for both runtimes")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = compare(args.export_dir, args.checkpoint, tuple(int(x) for x in args.batches.split(",")), args.repeats,
                   threads=args.threads)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
