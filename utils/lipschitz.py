"""Channel Lipschitz upper bounds (the quantity CLP prunes by), following the graph for BatchNorm.

For output channel c of a convolution with kernel W_c (in x kh x kw), CLP (Zheng et al., ECCV 2022)
measures the channel's sensitivity by its "upper bound of the channel Lipschitz constant",
UCLC_c = sigma_max(W_c reshaped to (in, kh*kw)), the largest singular value. For a Linear layer the
channel is a row w_c and this is ||w_c||_2, the channel's exact Lipschitz constant.

A BatchNorm in eval mode is per channel y_c = gamma_c (x_c - mu_c) / sqrt(var_c + eps) + beta_c,
a scaling by s_c = |gamma_c| / sqrt(var_c + eps) (CLP's code leaves out eps; we keep it). When
the BN's input is exactly a convolution's output (no operation in between), the pair conv->BN has
channel bound s_c * sigma_max(W_c): that is CLP's unit. Which convolution feeds a BN is found by running the model once and comparing
tensors (forward hooks: the BN's input must be the very tensor a conv/linear returned, unmodified
in place), not by the order in which modules were registered: in a pre-activation ResNet,
`layerX.Y.bn1` follows the residual sum of the previous block, not the previous conv (BackdoorBench's
script pairs it with whatever conv was registered last). Such a BN has no single conv feeding it;
we report it alone (kind "bn", bound s_c) and leave the convs that feed the sum as kind "conv".
Each convolution appears once: in its conv->BN pair when a BN consumes it, else alone.

CLP's threshold per layer: mean + u * std of the layer's channel bounds (std with Bessel's
correction, as torch.std); channels above it are the likely backdoor channels.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

WEIGHTED = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def kernel_lipschitz(module: nn.Module) -> torch.Tensor:
    """Per output channel: sigma_max of the kernel reshaped to (in, kh*kw) (Conv2d), or the row norm (Linear).

    One batched call per layer.
    """
    weight = module.weight.detach()
    if isinstance(module, nn.Conv2d):
        return torch.linalg.matrix_norm(weight.reshape(weight.shape[0], weight.shape[1], -1).double(), ord=2).float()
    if isinstance(module, nn.Linear):
        return torch.linalg.vector_norm(weight.double(), dim=1).float()
    raise TypeError(f"no channel Lipschitz bound for {type(module).__name__}")


@torch.no_grad()
def bn_scale(bn: nn.Module) -> torch.Tensor:
    """|gamma| / sqrt(running_var + eps): the BN's own per-channel Lipschitz constant in eval mode."""
    gamma = bn.weight.detach().abs() if bn.weight is not None else torch.ones(bn.num_features)
    if bn.running_var is None:
        return gamma.float()  # batch statistics only: the scale depends on the batch; gamma is what is fixed
    return (gamma.double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)).float()


@torch.no_grad()
def find_feeders(model: nn.Module, example: torch.Tensor) -> tuple[dict, list]:
    """Run `example` once; return ({bn_name: name of the conv/linear whose output it takes, or None},
    names of the analysable modules in the order they ran)."""
    produced, feeders, order, handles = {}, {}, [], []

    def after_weighted(name):
        def hook(module, inputs, output):
            # Keep the tensor itself: its id stays unique while it is alive, and _version tells
            # whether something (an in-place ReLU, a residual +=) changed it since.
            produced[id(output)] = (name, output, output._version)
            order.append(name)
        return hook

    def before_norm(name):
        def hook(module, inputs):
            x = inputs[0]
            entry = produced.get(id(x))
            feeders[name] = entry[0] if entry is not None and entry[1] is x and entry[2] == x._version else None
            order.append(name)
        return hook

    try:
        for name, module in model.named_modules():
            if isinstance(module, WEIGHTED):
                handles.append(module.register_forward_hook(after_weighted(name)))
            elif isinstance(module, NORMS):
                handles.append(module.register_forward_pre_hook(before_norm(name)))
        was_training = model.training
        model.eval()
        model(example)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    seen, ordered = set(), []
    for name in order:
        if name not in seen:
            seen.add(name)
            ordered.append(name)
    return feeders, ordered


@dataclass
class LayerLipschitz:
    name: str  # the unit's name: the BN's for conv->BN pairs, else the module's
    kind: str  # conv, linear, conv+bn, linear+bn, bn
    modules: str  # what the bound covers, e.g. "layer1.0.conv1 -> layer1.0.bn2"
    values: np.ndarray  # one bound per output channel
    threshold: float  # mean + u * std
    flagged: np.ndarray  # channel indices above the threshold


def clp_threshold(values: np.ndarray, u: float) -> float:
    if len(values) < 2:
        return float("inf")
    return float(values.mean() + u * values.std(ddof=1))


def compute_channel_lipschitz(model: nn.Module, example: torch.Tensor, u: float = 3.0) -> list[LayerLipschitz]:
    """Channel Lipschitz upper bounds of every Conv2d/Linear (with the BN each feeds) and BN, in run order.

    `example`: one input batch of the model's shape (only used to find which conv feeds which BN).
    """
    modules = dict(model.named_modules())
    feeders, ordered = find_feeders(model, example)
    never_ran = [n for n, m in modules.items() if isinstance(m, WEIGHTED + NORMS) and n not in set(ordered)]
    consumed = set()
    for bn_name, feeder in list(feeders.items()):
        bn = modules[bn_name]
        if feeder is not None and kernel_out(modules[feeder]) == bn.num_features:
            consumed.add(feeder)
        else:
            feeders[bn_name] = None
    units = []
    for name in ordered + never_ran:
        module = modules[name]
        if isinstance(module, NORMS):
            feeder = feeders.get(name)
            if feeder is not None:
                values = kernel_lipschitz(modules[feeder]) * bn_scale(module)
                kind = ("conv" if isinstance(modules[feeder], nn.Conv2d) else "linear") + "+bn"
                units.append((name, kind, f"{feeder} -> {name}", values))
            else:
                why = "not run on the example" if name in never_ran else "fed by no single conv: a sum, a concatenation, ..."
                units.append((name, "bn", f"{name} alone ({why})", bn_scale(module)))
        elif name not in consumed:
            kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
            units.append((name, kind, name, kernel_lipschitz(module)))
    return [finish_unit(*unit, u=u) for unit in units]


def kernel_out(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def finish_unit(name, kind, covers, values, u: float) -> LayerLipschitz:
    values = values.detach().cpu().numpy().astype(np.float64)
    threshold = clp_threshold(values, u)
    return LayerLipschitz(name, kind, covers, values, threshold, np.flatnonzero(values > threshold))
