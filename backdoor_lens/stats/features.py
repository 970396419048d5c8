"""One forward pass over a split, with hooks on every layer an analysis needs.

`FeatureHooks` records the outputs of many named modules during one forward call; `layer_output`
is one layer's output for a few images; `iterate` walks a loader once and hands each batch's
outputs to the caller, who reduces them (running sums, top-k, ...) so that memory does not grow
with the number of samples.
"""
import numpy as np
import torch

from backdoor_lens.device import progress
from backdoor_lens.errors import UserError
from backdoor_lens.models.layers import get_layer
from backdoor_lens.stats import passes


class FeatureHooks:
    """Forward hooks on named modules; `outputs[name]` holds what the module returned for the last batch.

    The output is copied inside the hook: a later in-place operation of the forward (torchvision's
    `ReLU(inplace=True)` after a BatchNorm, a residual `out += identity`) would otherwise overwrite
    the stored tensor before it is read. With `reduce(name, output)`, each output is reduced as soon
    as it is produced (per-channel sums, scores), before any later operation, and only the reduction
    is kept, so the full activation never stays in memory.

    A module that runs more than once per forward pass (torchvision's ResNet block applies its one
    `relu` twice) has no single output: hooking it is refused rather than mixing its calls.
    """

    def __init__(self, model: torch.nn.Module, names, reduce=None):
        self.names = list(names)
        self.outputs: dict = {}
        self._fired: set = set()
        self._handles = [model.register_forward_pre_hook(lambda module, inputs: self._fired.clear())]
        for name in self.names:
            module = get_layer(model, name)
            self._handles.append(module.register_forward_hook(self._hook(name, reduce)))

    def _hook(self, name, reduce):
        def hook(module, inputs, output):
            if name in self._fired:
                raise UserError(f"layer {name!r} runs more than once in one forward pass (a module used twice), "
                                f"so it has no single output; choose another layer")
            self._fired.add(name)
            if reduce is None:
                self.outputs[name] = output.detach().clone() if torch.is_tensor(output) else output
                return
            if not torch.is_tensor(output):
                raise UserError(f"layer {name!r} returns {type(output).__name__}, not a tensor; "
                                f"choose a Conv, BatchNorm or Linear layer")
            self.outputs[name] = reduce(name, output)
        return hook

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


@torch.inference_mode()
def layer_output(model, images: torch.Tensor, layer: str, device) -> np.ndarray:
    """What `layer` returns for a few images (a model-input batch), as float32: N x C x H x W (or N x C)."""
    model.eval()
    with FeatureHooks(model, [layer]) as hooks:
        model(images.to(device))
    return hooks.outputs[layer].float().cpu().numpy()


def iterate(model, loader, names, device, desc="features"):
    """Yield (batch, {layer: output}) for every batch of one pass, under inference_mode."""
    model.eval()
    with FeatureHooks(model, names) as hooks, torch.inference_mode():
        for batch in progress(loader, desc):
            x = batch[0].to(device, non_blocking=True)
            logits = model(x)
            outputs = dict(hooks.outputs)
            outputs["__logits__"] = logits
            yield batch, outputs


def pooled(output: torch.Tensor, how: str = "flatten") -> torch.Tensor:
    """N x C x H x W -> N x D: flattened ('flatten') or averaged over positions ('avg')."""
    if output.dim() <= 2:
        return output.flatten(1)
    if how == "avg":
        return output.flatten(2).mean(dim=2)
    return output.flatten(1)


def collect_features(model, loader, layer: str, device, how: str = "flatten", desc="features"):
    """Features of one layer for every sample, with the sample arrays, in one pass.

    Returns (features N x D float32 numpy, labels, original_labels, poison, indices, predictions).
    Memory is N x D: use `how='avg'` or --n_sub for large layers.
    """
    key = passes.pass_key(model, loader)
    if key is not None:
        kept = passes.active().find("features", key, (layer, how), [layer])
        if kept is not None:
            return tuple(np.array(part, copy=True) for part in kept)
    result = _collect_features(model, loader, layer, device, how, desc)
    if key is not None:
        passes.active().keep("features", key, (layer, how), [layer], 0, result)
        result = tuple(np.array(part, copy=True) for part in result)
    return result


def _collect_features(model, loader, layer: str, device, how: str, desc: str):
    feats, labels, originals, poisons, indices, preds = [], [], [], [], [], []
    for (x, y, y0, p, idx), outputs in iterate(model, loader, [layer], device, desc):
        feats.append(pooled(outputs[layer], how).float().cpu())
        preds.append(outputs["__logits__"].argmax(1).cpu())
        labels.append(y); originals.append(y0); poisons.append(p); indices.append(idx)
    return (torch.cat(feats).numpy(), torch.cat(labels).numpy(), torch.cat(originals).numpy(),
            torch.cat(poisons).numpy().astype(bool), torch.cat(indices).numpy(), torch.cat(preds).numpy())
