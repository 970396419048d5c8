"""Layers by name, with the valid names listed on a miss."""
import torch.nn as nn

from backdoor_lens.errors import UserError

ANALYSABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)


def named_layers(model: nn.Module, kinds=ANALYSABLE) -> list[str]:
    return [name for name, module in model.named_modules() if name and isinstance(module, kinds)]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    valid = named_layers(model)
    shown = ", ".join(valid[:12]) + (f", ... ({len(valid)} in all)" if len(valid) > 12 else "")
    raise UserError(f"layer {name!r} is not in the model; valid names include: {shown}")


def resolve_layers(model: nn.Module, names) -> list[str]:
    """Validate a list of names (comma-separated string or list)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    for name in names:
        get_layer(model, name)
    return list(names)


def penultimate_layer(model: nn.Module) -> str:
    """The last Linear layer, whose input is the penultimate representation."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise UserError("the model has no Linear layer, so no penultimate layer; name one with --target_layer_name")
    return linears[-1]
