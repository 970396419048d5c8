"""BackdoorBench's metrics: clean accuracy, attack success rate, robust accuracy (and DER, RIR).

ACC is accuracy on clean_test; ASR is accuracy of bd_test predictions against the attack labels;
RA against the original labels. With a defense, DER and RIR compare the two models.
"""
from dataclasses import dataclass, field

import numpy as np

from backdoor_lens.analysis import Analysis
from backdoor_lens.plot.metric import radar_figure
from backdoor_lens.report.numbers import listed_numbers
from backdoor_lens.stats.metrics import der, model_metrics, rir


@dataclass(frozen=True)
class Settings:
    n_sub: int | None


def settings(args) -> Settings:
    return Settings(n_sub=args.n_sub)


@dataclass
class MetricResult:
    record: str
    metrics: dict  # {model label: {"clean_accuracy", "asr", "ra"}}
    row: dict  # the summary row: every model's metrics, DER and RIR with a defense
    clean_samples: int
    bd_samples: int
    notes: list = field(default_factory=list)


def summary_row(results: dict) -> dict:
    row = {f"{k}_attack": v for k, v in results["attack"].items()}
    if "defense" in results:
        row.update({f"{k}_defense": v for k, v in results["defense"].items()})
        a, d = results["attack"], results["defense"]
        if not np.isnan(a["asr"]):
            row["der"] = der(a["asr"], a["clean_accuracy"], d["asr"], d["clean_accuracy"])
            row["rir"] = rir(a["ra"], a["clean_accuracy"], d["ra"], d["clean_accuracy"])
    return row


def compute(ctx, settings: Settings) -> MetricResult:
    # Both test splits, always: the metrics are defined on them, whatever --visual_dataset says.
    clean = ctx.get_split("clean_test", n_sub=settings.n_sub)
    bd = ctx.get_split("bd_test", n_sub=settings.n_sub) if ctx.record.bd_test is not None else None
    notes = [] if bd is not None else ["this record has no poisoned test samples: only clean accuracy is measured"]
    clean_loader = ctx.loader(clean)
    bd_loader = ctx.loader(bd) if bd is not None else None
    results = {label: model_metrics(model, clean_loader, bd_loader, ctx.device) for label, model in ctx.models.items()}
    return MetricResult(ctx.record.name, results, summary_row(results), len(clean), len(bd) if bd is not None else 0,
                        notes)


def write(result: MetricResult, ctx) -> dict:
    for note in result.notes:
        print(note)
    row = result.row
    ctx.out.save_csv("metric_summary", [list(row.values())], header=list(row.keys()))
    for label, r in result.metrics.items():
        print(f"{label} model: clean accuracy {r['clean_accuracy']:.4f}, ASR {r['asr']:.4f}, RA {r['ra']:.4f}")
    if "der" in row:
        print(f"DER {row['der']:.4f}, RIR {row['rir']:.4f}")
    ctx.out.save_figure(radar_figure(result.metrics, f"Metrics of {result.record}"), "metric_radar")
    return dict(row, clean_samples=result.clean_samples, bd_samples=result.bd_samples)


def key_numbers(folder) -> list:
    return listed_numbers(folder, "clean accuracy / ASR / robust accuracy",
                          ("clean_accuracy_attack", "asr_attack", "ra_attack", "clean_accuracy_defense",
                           "asr_defense", "ra_defense", "der", "rir"))


ANALYSIS = Analysis(
    name="metric", title="Metrics", order=0,
    shows="clean accuracy, attack success rate and robust accuracy",
    guide="A working backdoor keeps clean accuracy high and reaches a high ASR; RA is the accuracy on triggered "
          "inputs against their true labels.",
    compute=compute, write=write, settings=settings, key_numbers=key_numbers,
    splits=("clean_test", "bd_test"), default_split="clean_test",
    compares=True, on_blended_demo=True, quick_args=("--n_sub", "24"))
