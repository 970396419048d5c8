"""Channel Lipschitz upper bounds (the quantity CLP prunes by), with two ways to pair a conv with its BN.

CLP (Zheng et al., ECCV 2022) bounds each channel k of a convolution followed by batch norm:

    UCLC_k = sigma_max(W_k) * |gamma_k| / sqrt(var_k + eps)

W_k is the conv's kernel for output channel k reshaped to (in_channels, kh*kw); gamma, var and eps
belong to the BatchNorm that the conv's output reaches (in eval mode a BN scales channel k by
|gamma_k| / sqrt(var_k + eps)). For a Linear layer the channel is a row w_k and sigma_max is ||w_k||_2.

Pairings:

- "dataflow" (default: the paper's definition). The model runs once on an example and each
  conv's (or linear's) output is followed through the autograd graph to the first BatchNorm that
  takes it, passing through residual sums (a BN scales channel k of a sum by the same factor for
  every summand), ReLUs (channel-wise and 1-Lipschitz, so the bound still holds) and copies, in place
  or not. In a pre-activation ResNet, conv2 and the shortcut conv of a block both reach the next
  block's bn1 (the last block's reach no BN); in post-activation nets (torchvision ResNet, VGG-BN)
  each conv reaches the BN right after it. A conv whose output meets another conv, a pooling, a
  concatenation, ... before any BN reaches no BN and keeps its raw kernel norm ("raw kernel norm,
  reaches no BN"). eps is included, as in the paper. A BN that no conv reaches (one on a
  concatenation, say) is reported alone, with its scale |gamma| / sqrt(var + eps).
- "backdoorbench": exactly what BackdoorBench's CLP defense computes (defense/clp.py, CLP_prune):
  each BatchNorm2d is paired with the last Conv2d registered before it in named_modules() order,
  whatever the data flow, with std = sqrt(running_var) (no eps), in float32, the kernel of channel
  k reshaped to (in_channels, -1) and scaled before its SVD; the channels above mean + u * std of
  that BN are the ones the defense zeroes (the BN's weight and bias). In BackdoorBench's PreActBlock
  (registered bn1, conv1, bn2, conv2, shortcut) the bn1 of a block is therefore paired with the
  shortcut conv of the block before when it has one, and the conv2 of such a block is never weighed.

CLP's threshold per layer: mean + u * std of the layer's channel bounds (std with Bessel's
correction, as torch.std); channels above it are flagged.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from backdoor_lens.errors import UserError

WEIGHTED = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
PAIRINGS = ("dataflow", "backdoorbench")
RAW = "raw kernel norm, reaches no BN"

# Autograd nodes a channel passes unchanged in index on its way to a BN, and how to say so. An
# AddBackward0 is a sum of tensors (or a shift by a constant); it is named after its common use.
PASS_THROUGH = {"AddBackward0": "a residual sum", "ReluBackward0": "a ReLU", "CloneBackward0": None}


@dataclass
class LayerLipschitz:
    name: str  # the unit's name: the conv's (or linear's) in dataflow mode, the BN's in backdoorbench mode
    kind: str  # conv+bn, linear+bn (paired), conv, linear (raw kernel norm), bn (a BN no conv reaches)
    conv: str  # the conv or linear bounded ("" for a BN alone)
    bn: str  # the BN that scales it ("" for a raw kernel norm)
    modules: str  # the pairing in words, e.g. "layer2.0.conv2 -> layer2.1.bn1 (through a residual sum)"
    values: np.ndarray  # one bound per output channel
    threshold: float  # mean + u * std
    flagged: np.ndarray  # channel indices above the threshold


@torch.no_grad()
def kernel_lipschitz(module: nn.Module) -> torch.Tensor:
    """Per output channel: sigma_max of the kernel reshaped to (in, kh*kw) (Conv2d), or the row norm (Linear).

    One batched call per layer; SVDs in float64. Row norms stay in the weight's precision (float32
    sums are accurate to about 1e-6 relative): a float64 copy of a VGG classifier's 100M weights
    takes seconds.
    """
    weight = module.weight.detach()
    if isinstance(module, nn.Conv2d):
        return torch.linalg.matrix_norm(weight.reshape(weight.shape[0], weight.shape[1], -1).double(), ord=2)
    if isinstance(module, nn.Linear):
        return torch.linalg.vector_norm(weight, dim=1).double()
    raise TypeError(f"no channel Lipschitz bound for {type(module).__name__}")


@torch.no_grad()
def bn_scale(bn: nn.Module) -> torch.Tensor:
    """|gamma| / sqrt(running_var + eps): the BN's own per-channel Lipschitz constant in eval mode."""
    gamma = bn.weight.detach().abs().double() if bn.weight is not None else torch.ones(bn.num_features).double()
    if bn.running_var is None:
        return gamma  # batch statistics only: the scale depends on the batch; gamma is what is fixed
    return gamma / torch.sqrt(bn.running_var.detach().double() + bn.eps)


def clp_threshold(values: np.ndarray, u: float) -> float:
    if len(values) < 2:
        return float("inf")
    return float(values.mean() + u * values.std(ddof=1))


def compute_channel_lipschitz(model: nn.Module, example: torch.Tensor | None = None, u: float = 3.0,
                              pairing: str = "dataflow") -> list[LayerLipschitz]:
    """Channel Lipschitz upper bounds of a model (see the module docstring for the two pairings).

    `example`: one input batch of the model's shape, run once to follow the data flow (the
    backdoorbench pairing reads the registration order and needs none).
    """
    if pairing == "backdoorbench":
        return backdoorbench_units(model, u)
    if pairing != "dataflow":
        raise ValueError(f"pairing must be one of {PAIRINGS}, not {pairing!r}")
    if example is None:
        raise ValueError("the dataflow pairing runs the model once: pass an example input")
    return dataflow_units(model, example, u)


# --- dataflow: the paper's definition ---------------------------------------------------------------

def trace_reached_norms(model: nn.Module, example: torch.Tensor) -> tuple[dict, list]:
    """Run `example` once; return ({conv/linear name: (first BN its output reaches, what it passed)},
    names of the Conv2d/Linear/BN modules in the order they first ran).

    Each conv's output node in the autograd graph is remembered; before each BN runs, its input's
    graph is walked back through PASS_THROUGH nodes to the conv outputs it is made of. Autograd
    nodes survive in-place operations (an in-place ReLU becomes a node after the conv's), so this
    holds where comparing tensors would not.
    """
    producers, reached, order, handles = {}, {}, [], []

    def after_weighted(name):
        def hook(module, inputs, output):
            producers[output.grad_fn] = name
            order.append(name)
        return hook

    def before_norm(name):
        def hook(module, inputs):
            order.append(name)
            for producer, passed in walk_back(inputs[0].grad_fn, producers):
                reached.setdefault(producer, (name, passed))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, WEIGHTED):
            handles.append(module.register_forward_hook(after_weighted(name)))
        elif isinstance(module, NORMS):
            handles.append(module.register_forward_pre_hook(before_norm(name)))
    was_training = model.training
    try:
        model.eval()
        # A graph is needed even when called under inference_mode or with frozen parameters.
        with torch.inference_mode(False), torch.enable_grad():
            model(example.detach().clone().requires_grad_(True))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return reached, list(dict.fromkeys(order))


def walk_back(node, producers: dict):
    """(producer name, frozenset of what was passed) for each conv/linear output that reaches `node`
    through PASS_THROUGH nodes only."""
    found, stack, seen = [], [(node, frozenset())], set()
    while stack:
        node, passed = stack.pop()
        if node is None or (node, passed) in seen:
            continue
        seen.add((node, passed))
        if node in producers:
            found.append((producers[node], passed))
            continue
        kind = type(node).__name__
        if kind in PASS_THROUGH:
            step = passed | {PASS_THROUGH[kind]} if PASS_THROUGH[kind] else passed
            stack.extend((parent, step) for parent, _ in node.next_functions)
    return found


def dataflow_units(model: nn.Module, example: torch.Tensor, u: float) -> list[LayerLipschitz]:
    modules = dict(model.named_modules())
    reached, ordered = trace_reached_norms(model, example)
    never_ran = [n for n, m in modules.items() if isinstance(m, WEIGHTED + NORMS) and n not in set(ordered)]
    pairs = {name: (bn, passed) for name, (bn, passed) in reached.items()
             if channels_out(modules[name]) == modules[bn].num_features}
    paired_norms = {bn for bn, _ in pairs.values()}
    units = []
    for name in ordered + never_ran:
        module = modules[name]
        if isinstance(module, NORMS):
            if name not in paired_norms:
                why = "not run on the example" if name in never_ran else "no conv output reaches it"
                units.append(finish_unit(name, "bn", "", name, f"{name} alone ({why})", bn_scale(module), u))
            continue
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        if name in pairs:
            bn, passed = pairs[name]
            through = f" (through {' and '.join(sorted(passed))})" if passed else ""
            units.append(finish_unit(name, kind + "+bn", name, bn, f"{name} -> {bn}{through}",
                                     kernel_lipschitz(module) * bn_scale(modules[bn]), u))
        else:
            words = RAW if name not in never_ran else f"{RAW} (not run on the example)"
            units.append(finish_unit(name, kind, name, "", words, kernel_lipschitz(module), u))
    return units


def channels_out(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def finish_unit(name, kind, conv, bn, words, values: torch.Tensor, u: float) -> LayerLipschitz:
    values = values.detach().cpu().numpy().astype(np.float64)
    threshold = clp_threshold(values, u)
    return LayerLipschitz(name, kind, conv, bn, words, values, threshold, np.flatnonzero(values > threshold))


# --- backdoorbench: what its CLP defense zeroes -----------------------------------------------------

@torch.no_grad()
def backdoorbench_units(model: nn.Module, u: float) -> list[LayerLipschitz]:
    """One unit per BatchNorm2d, computed as BackdoorBench's CLP_prune does (float32, no eps,
    the last Conv2d registered before the BN); `flagged` are the channels it zeroes."""
    units, conv = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            conv = (name, module)
        elif isinstance(module, nn.BatchNorm2d):
            units.append(backdoorbench_unit(name, module, conv, u))
    return units


def backdoorbench_unit(name: str, bn: nn.BatchNorm2d, conv, u: float) -> LayerLipschitz:
    cannot = "BackdoorBench's CLP cannot run on this model"
    if conv is None:
        raise UserError(f"{cannot}: no Conv2d is registered before BatchNorm2d '{name}'; use --pairing dataflow")
    conv_name, conv_module = conv
    if bn.weight is None or bn.running_var is None:
        raise UserError(f"{cannot}: BatchNorm2d '{name}' has no weight or no running variance; "
                        f"use --pairing dataflow")
    weight = conv_module.weight.detach().cpu()
    if weight.shape[0] < bn.num_features:
        raise UserError(f"{cannot}: BatchNorm2d '{name}' has {bn.num_features} channels but the conv registered "
                        f"before it, '{conv_name}', has {weight.shape[0]} output channels; use --pairing dataflow")
    # The same float32 operations as CLP_prune, so that the channels on the threshold fall the same way:
    # the kernel scaled by |gamma / sqrt(var)| before the SVD, torch's mean and unbiased std.
    scale = (bn.weight.detach().cpu() / bn.running_var.detach().cpu().sqrt()).abs()
    kernels = weight[:bn.num_features].reshape(bn.num_features, weight.shape[1], -1) * scale[:, None, None]
    lips = torch.linalg.svd(kernels, full_matrices=False).S.amax(dim=1)
    threshold = lips.mean() + u * lips.std()
    flagged = torch.where(lips > threshold)[0].numpy()
    # A conv wider than the BN: CLP_prune uses its first channels, and so do we.
    part = f" (its first {bn.num_features} of {weight.shape[0]} channels)" if weight.shape[0] > bn.num_features else ""
    words = f"{conv_name}{part} -> {name} (BackdoorBench: last conv registered before the BN, sqrt(var), no eps)"
    return LayerLipschitz(name, "conv+bn", conv_name, name, words, lips.double().numpy(), float(threshold), flagged)
