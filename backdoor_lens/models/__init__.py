"""The model zoo under BackdoorBench's names, and loading of the state_dicts its runs saved."""
import torch
import torch.nn as nn

from backdoor_lens.errors import UserError
from backdoor_lens.models.preact_resnet import PreActResNet18  # noqa: F401  (re-exported)

# Torchvision builders BackdoorBench uses (no pretrained weights: nothing is downloaded).
TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "vgg19",
                      "mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0", "efficientnet_b3",
                      "convnext_tiny", "densenet121", "densenet161")
MODEL_NAMES = ("preactresnet18",) + TORCHVISION_MODELS

# The layer an analysis looks at when none is named: the last convolution of the last block.
DEFAULT_LAYERS = {"preactresnet18": "layer4.1.conv2", "resnet18": "layer4.1.conv2", "resnet34": "layer4.2.conv2",
                  "resnet50": "layer4.2.conv3", "vgg19": "features.34", "vgg19_bn": "features.49",
                  "mobilenet_v3_large": "features.16.0"}


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    key = name.lower()
    if key == "preactresnet18":
        return PreActResNet18(num_classes=num_classes, in_channels=in_channels)
    if key in TORCHVISION_MODELS:
        import torchvision.models as tv

        return getattr(tv, key)(weights=None, num_classes=num_classes)
    raise UserError(f"model {name!r} is not in the zoo; known models: {', '.join(MODEL_NAMES)} "
                    f"(pass --model to override the record's name)")


def model_in_channels(name: str, state_dict: dict, data_channels: int) -> int:
    """Input channels the trained weights expect: the first 4-D weight tells, else the data does."""
    for value in state_dict.values():
        if torch.is_tensor(value) and value.dim() == 4:
            return int(value.shape[1])
    return data_channels if name.lower() == "preactresnet18" else 3


def default_layer_name(name: str, model: nn.Module) -> str:
    if name.lower() in DEFAULT_LAYERS:
        return DEFAULT_LAYERS[name.lower()]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError(f"model {name} has no convolution; name a layer with --target_layer_name")
    return convs[-1]


def adapt_state_dict(state_dict: dict, expected: set) -> dict:
    """Undo the wrappings BackdoorBench runs leave on a state_dict.

    - `module.` prefixes from DataParallel;
    - pruning by torch.nn.utils.prune (`X.weight_orig` and `X.weight_mask`): weight = orig * mask;
    - DBD's wrapper (`backbone.*` plus the head), and any single prefix that maps onto the model.
    """
    sd = {}
    for key, value in state_dict.items():
        key = str(key)
        while key.startswith("module."):
            key = key[len("module."):]
        sd[key] = value
    for key in [k for k in sd if k.endswith("_orig")]:
        base = key[: -len("_orig")]
        mask = sd.pop(base + "_mask", None)
        orig = sd.pop(key)
        sd[base] = orig * mask if mask is not None else orig
    if set(sd) == expected:
        return sd
    for prefix in ("backbone.", "model.", "net.", "encoder."):
        stripped = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
        if set(stripped) == expected:
            return stripped
    return sd


def load_weights(model: nn.Module, state_dict: dict, source: str) -> nn.Module:
    """Load a BackdoorBench state_dict, or say exactly which keys or shapes do not fit."""
    if not isinstance(state_dict, dict):
        raise UserError(f"{source}: the stored model is not a state_dict")
    expected = set(model.state_dict())
    sd = adapt_state_dict(state_dict, expected)
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise UserError(f"{source}: the state_dict does not fit {type(model).__name__}: "
                        f"missing keys {_few(missing)}; unexpected keys {_few(unexpected)}; "
                        f"check --model or the record")
    own = model.state_dict()
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
           if torch.is_tensor(sd[k]) and sd[k].shape != own[k].shape]
    if bad:
        raise UserError(f"{source}: state_dict shapes do not fit the model: {_few(bad)}; "
                        f"check --model and --num_classes")
    model.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()}, strict=True)
    return model


def _few(items, n: int = 5) -> str:
    if not items:
        return "none"
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
