"""Confusion matrix of a split: which classes the model confuses, and where poisoned samples go.

Rows are the served labels of the split (for poisoned samples the attack label), columns the
predictions; the figure is row-normalised. With a defense, attack and defense side by side.
"""
from dataclasses import dataclass

import numpy as np

from backdoor_lens.analysis import Analysis
from backdoor_lens.plot.confusion import confusion_figure
from backdoor_lens.stats.metrics import accuracy, confusion_matrix, predict


def add_arguments(parser):
    parser.add_argument("--normalize", choices=("true", "none"), default="true",
                        help="row-normalise the figure ('true') or show counts ('none')")


@dataclass(frozen=True)
class Settings:
    normalize: bool


def settings(args) -> Settings:
    return Settings(normalize=args.normalize == "true")


@dataclass
class ConfusionResult:
    split: str
    samples: int
    record: str
    class_names: list
    normalize: bool
    matrices: dict  # {model label: K x K counts, rows labels, columns predictions}
    accuracies: dict  # {model label: accuracy on the split}


def compute(ctx, settings: Settings) -> ConfusionResult:
    split = ctx.use_split()
    loader = ctx.loader(split)
    matrices, accuracies = {}, {}
    for label, model in ctx.models.items():
        preds = predict(model, loader, ctx.device, desc="confusion")
        matrices[label] = confusion_matrix(preds.pred, preds.labels, ctx.num_classes)
        accuracies[label] = accuracy(preds.pred, preds.labels)
    return ConfusionResult(split.name, len(split), ctx.record.name, list(ctx.class_names), settings.normalize,
                           matrices, accuracies)


def write(result: ConfusionResult, ctx) -> dict:
    names = result.class_names
    summary = {"split": result.split, "samples": result.samples}
    for label, matrix in result.matrices.items():
        ctx.out.save_csv(f"confusion_matrix_{label}", [[names[i]] + np.asarray(matrix[i]).tolist()
                                                       for i in range(len(names))], header=["label\\prediction"] + names)
        summary[f"accuracy_{label}"] = result.accuracies[label]
        print(f"{label} model: accuracy on {result.split} ({result.samples} samples) = {result.accuracies[label]:.4f}")
    ctx.out.save_figure(confusion_figure(result.matrices, result.accuracies, names, result.split, result.record,
                                         result.normalize), "confusion_matrix")
    return summary


ANALYSIS = Analysis(
    name="cm", title="Confusion matrix", order=1,
    guide="Rows are labels, columns predictions; a backdoor pulls poisoned rows into the target column.",
    shows="the confusion matrix of a split",
    compute=compute, write=write, settings=settings, add_arguments=add_arguments,
    splits=("clean_test", "bd_test", "mixed", "bd_train", "clean_train", "subset"), default_split="clean_test",
    compares=True, demo_args=("--visual_dataset", "bd_train"), quick_args=("--n_sub", "24"))
