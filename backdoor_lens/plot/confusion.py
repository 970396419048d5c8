"""The confusion-matrix figure: one row-normalised (or count) matrix per model, side by side."""
import numpy as np

from backdoor_lens.plot.base import plt, side_by_side, tick_labels


def draw_confusion(ax, matrix: np.ndarray, names, title: str, normalize: bool):
    shown = matrix / np.maximum(matrix.sum(1, keepdims=True), 1) if normalize else matrix
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest")
    n = len(names)
    if n <= 20:  # numbers in the cells only while they stay readable
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


def confusion_figure(matrices: dict, accuracies: dict, names, split: str, record: str, normalize: bool):
    """matrices: {model label: K x K counts}; one panel per model."""
    fig, axes = side_by_side(len(matrices), width=6 if len(names) <= 20 else 9, height=5 if len(names) <= 20 else 8)
    for ax, (label, matrix) in zip(axes, matrices.items()):
        draw_confusion(ax, matrix, names, f"{label} model on {split}: accuracy {accuracies[label]:.3f}", normalize)
    fig.suptitle(f"Confusion matrix, {record}, {split}", fontsize=11)
    return fig
