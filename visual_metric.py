"""BackdoorBench's metrics: clean accuracy, attack success rate, robust accuracy (and DER, RIR).

ACC is accuracy on clean_test; ASR is accuracy of bd_test predictions against the attack labels;
RA against the original labels. With a defense, DER and RIR compare the two models.
"""
import numpy as np

from utils.cli import main
from utils.context import load_context
from utils.metrics import accuracy, der, predict, rir
from utils.plotting import plt


DEMO_ARGS = []


def add_arguments(parser):
    pass


def compute_metrics(model, clean_loader, bd_loader, device) -> dict:
    """clean_accuracy, asr and ra of one model (asr/ra NaN without poisoned test samples)."""
    clean = predict(model, clean_loader, device, desc="clean_test")
    result = {"clean_accuracy": accuracy(clean.pred, clean.labels), "asr": float("nan"), "ra": float("nan")}
    if bd_loader is not None:
        bd = predict(model, bd_loader, device, desc="bd_test")
        result["asr"] = accuracy(bd.pred, bd.labels)
        result["ra"] = accuracy(bd.pred, bd.original_labels)
    return result


def summary_row(results: dict) -> dict:
    row = {f"{k}_attack": v for k, v in results["attack"].items()}
    if "defense" in results:
        row.update({f"{k}_defense": v for k, v in results["defense"].items()})
        a, d = results["attack"], results["defense"]
        if not np.isnan(a["asr"]):
            row["der"] = der(a["asr"], a["clean_accuracy"], d["asr"], d["clean_accuracy"])
            row["rir"] = rir(a["ra"], a["clean_accuracy"], d["ra"], d["clean_accuracy"])
    return row


def draw_radar(results: dict, title: str):
    axes_names = ["clean accuracy", "ASR", "robust accuracy", "1 - ASR"]
    angles = np.linspace(0, 2 * np.pi, len(axes_names), endpoint=False).tolist()
    fig = plt.figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot(111, polar=True)
    for (label, r), color in zip(results.items(), ("#d62728", "#1f77b4")):
        values = [r["clean_accuracy"], r["asr"], r["ra"], 1 - r["asr"]]
        values = [0.0 if np.isnan(v) else v for v in values]
        ax.plot(angles + angles[:1], values + values[:1], color=color, label=f"{label} model")
        ax.fill(angles + angles[:1], values + values[:1], color=color, alpha=0.15)
        for angle, value in zip(angles, values):
            ax.annotate(f"{value:.2f}", (angle, value), fontsize=7, color=color)
    ax.set_xticks(angles); ax.set_xticklabels(axes_names); ax.set_ylim(0, 1)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1), fontsize=8)
    ax.set_title(title, fontsize=10, pad=20)
    return fig


def run(args) -> dict:
    with load_context(args, "metric", split=None) as ctx:
        clean = ctx.get_split("clean_test", n_sub=args.n_sub)
        bd = ctx.get_split("bd_test", n_sub=args.n_sub) if ctx.record.bd_test is not None else None
        if bd is None:
            print("this record has no poisoned test samples: only clean accuracy is measured")
        clean_loader = ctx.loader(clean)
        bd_loader = ctx.loader(bd) if bd is not None else None
        results = {label: compute_metrics(model, clean_loader, bd_loader, ctx.device)
                   for label, model in ctx.models.items()}
        row = summary_row(results)
        ctx.out.save_csv("metric_summary", [list(row.values())], header=list(row.keys()))
        for label, r in results.items():
            print(f"{label} model: clean accuracy {r['clean_accuracy']:.4f}, ASR {r['asr']:.4f}, RA {r['ra']:.4f}")
        if "der" in row:
            print(f"DER {row['der']:.4f}, RIR {row['rir']:.4f}")
        ctx.out.save_figure(draw_radar(results, f"Metrics of {ctx.record.name}"), "metric_radar")
        summary = dict(row, clean_samples=len(clean), bd_samples=len(bd) if bd is not None else 0)
        ctx.out.save_json("summary", summary)
        return ctx.finish(summary)


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__)
