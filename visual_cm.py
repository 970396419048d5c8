"""Confusion matrix of a split: which classes the model confuses, and where poisoned samples go.

Rows are the served labels of the split (for poisoned samples the attack label), columns the
predictions; the figure is row-normalised. With a defense, attack and defense side by side.
"""
import numpy as np

from utils.cli import main
from utils.context import load_context
from utils.metrics import accuracy, confusion_matrix, predict
from utils.plotting import plt, side_by_side, tick_labels


DEMO_ARGS = ["--visual_dataset", "bd_train"]


def add_arguments(parser):
    parser.add_argument("--normalize", choices=("true", "none"), default="true",
                        help="row-normalise the figure ('true') or show counts ('none')")


def compute_confusion(model, loader, device, num_classes: int):
    preds = predict(model, loader, device, desc="confusion")
    return confusion_matrix(preds.pred, preds.labels, num_classes), accuracy(preds.pred, preds.labels)


def draw_confusion(ax, matrix: np.ndarray, names, title: str, normalize: bool):
    shown = matrix / np.maximum(matrix.sum(1, keepdims=True), 1) if normalize else matrix
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest")
    n = len(names)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    text = f"{shown[i, j]:.2f}" if normalize else str(matrix[i, j])
                    ax.text(j, i, text, ha="center", va="center", fontsize=6 if n > 10 else 7,
                            color="white" if shown[i, j] > 0.5 * shown.max() else "black")
    tick_labels(ax, names)
    ax.set_xlabel("predicted class"); ax.set_ylabel("label (attack label for poisoned samples)")
    ax.set_title(title, fontsize=10)
    plt.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def run(args) -> dict:
    with load_context(args, "cm") as ctx:
        loader = ctx.loader(ctx.split)
        names = list(ctx.class_names)
        results = {label: compute_confusion(model, loader, ctx.device, ctx.num_classes)
                   for label, model in ctx.models.items()}
        fig, axes = side_by_side(len(results), width=6 if len(names) <= 20 else 9, height=5 if len(names) <= 20 else 8)
        summary = {"split": ctx.split.name, "samples": len(ctx.split)}
        for ax, (label, (matrix, acc)) in zip(axes, results.items()):
            draw_confusion(ax, matrix, names, f"{label} model on {ctx.split.name}: accuracy {acc:.3f}",
                           args.normalize == "true")
            ctx.out.save_csv(f"confusion_matrix_{label}", [[names[i]] + matrix[i].tolist() for i in range(len(names))],
                             header=["label\\prediction"] + names)
            summary[f"accuracy_{label}"] = acc
            print(f"{label} model: accuracy on {ctx.split.name} ({len(ctx.split)} samples) = {acc:.4f}")
        fig.suptitle(f"Confusion matrix, {ctx.record.name}, {ctx.split.name}", fontsize=11)
        ctx.out.save_figure(fig, "confusion_matrix")
        ctx.out.save_json("summary", summary)
        return ctx.finish(summary)


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__, default_split="clean_test")
