"""The feature-visualisation figure: one synthetic image per objective, its final value beneath."""
import torch

from backdoor_lens.plot.base import grid, show_image


def feature_vis_figure(images, objectives, values, class_names, target, title: str):
    """images: N x C x H x W in [0, 1], one per objective; values: each objective's final value.
    Class logits are titled in red, the attack target marked."""
    fig, axes = grid(len(objectives), max_cols=8, cell=1.9, extra_height=0.8)
    for ax, image, objective, value in zip(axes, torch.from_numpy(images), objectives, values):
        label = objective.label(class_names)
        if objective.kind == "logit" and objective.index == target:
            label += " (target)"
        show_image(ax, image, f"{label}\n{'logit' if objective.kind == 'logit' else 'act'} {value:.3g}",
                   color="#d62728" if objective.kind == "logit" else "black", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig
