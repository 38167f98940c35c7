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


def plot_comparison(doc: dict, out_png: str, metric: str = "NDCG@10", split: str = "test") -> str:
    """PNG of a compare.json document: one row of panels per preset (image tower), one panel per
    query group that has a kind (or per positive modality when the data records no kinds), bars =
    variants, x = caption-keep rate, mean with the seeds' sd as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in doc["variants"] if v.get("summary", {}).get(split)]
    if not variants:
        raise ValueError(f"no variant has {split} results to plot")
    presets = list(dict.fromkeys(v.get("preset", doc.get("preset")) for v in variants))
    results = variants[0]["summary"][split]
    rates = list(results)
    groups = [g for g in results[rates[0]] if g.startswith("kind:")] or \
        [g for g in results[rates[0]] if g in ("image", "text")]
    fig, axes = plt.subplots(len(presets), len(groups), figsize=(3.2 * len(groups) + 1, 3.4 * len(presets)),
                             sharey=True, squeeze=False)
    counts = {len(v.get("runs", [])) for v in variants}  # seeds per variant
    for row, name in zip(axes, presets):
        members = [v for v in variants if v.get("preset", doc.get("preset")) == name]
        width = 0.8 / len(members)
        for ax, group in zip(row, groups):
            for i, v in enumerate(members):
                cells = [((v["summary"][split].get(r) or {}).get(group) or {}).get(metric) or {} for r in rates]
                means = [c.get("mean") or 0.0 for c in cells]
                sds = [c.get("sd") or 0.0 for c in cells]
                ax.bar([x + (i - (len(members) - 1) / 2) * width for x in range(len(rates))], means, width,
                       yerr=sds, capsize=2,
                       label=v["name"] + ("" if len(counts) == 1 else f" ({len(v['runs'])} seeds)"))
            ax.set_xticks(range(len(rates)), [f"keep {r}" for r in rates])
            ax.set_title(group.removeprefix("kind:") + ("" if len(presets) == 1 else f" ({members[0].get('tower') or name})"),
                         fontsize=9)
            ax.set_ylim(0, 105)
        row[0].set_ylabel(f"{split} {metric}")
        row[-1].legend(fontsize=7, loc="lower left")
    n = f"{max(counts)}" if len(counts) == 1 else f"{min(counts)}-{max(counts)}"
    steps = (doc.get("budget") or {}).get("steps")
    fig.suptitle(f"{', '.join(presets)} on {doc.get('data')}: mean of {n} seeds"
                 + (f", {steps} steps each" if steps else "") + " (error bars: sd)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
