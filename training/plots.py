"""PNG of the training curves from metrics.jsonl: loss and in-batch accuracy per step, dev MRR@10 per evaluation."""
from __future__ import annotations

import json


def plot_curves(metrics_jsonl: str, out_png: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loss, acc, ev_steps, ev_mrr = [], [], [], [], {}
    with open(metrics_jsonl, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if "loss" in rec:
                steps.append(rec["step"])
                loss.append(rec["loss"])
                acc.append(rec["acc"])
            elif "dev" in rec:
                ev_steps.append(rec["step"])
                for rate, res in rec["dev"].items():
                    ev_mrr.setdefault(rate, []).append(res["all"]["MRR@10"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(steps, loss, label="loss", color="tab:blue")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("InfoNCE loss")
    twin = axes[0].twinx()
    twin.plot(steps, acc, label="in-batch acc", color="tab:orange", alpha=0.7)
    twin.set_ylabel("in-batch top-1 accuracy")
    axes[0].set_title("training")
    for rate, values in ev_mrr.items():
        axes[1].plot(ev_steps, values, marker="o", label=f"caption keep {rate}")
    axes[1].legend()
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("dev MRR@10")
    axes[1].set_title("evaluation")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
