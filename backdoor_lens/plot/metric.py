"""The metrics radar: clean accuracy, ASR, robust accuracy and 1 - ASR of each model on one polar chart."""
import numpy as np

from backdoor_lens.plot.base import plt


def radar_figure(results: dict, title: str):
    """results: {model label: {"clean_accuracy", "asr", "ra"}}; a NaN (no poisoned test samples) is drawn as 0."""
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
