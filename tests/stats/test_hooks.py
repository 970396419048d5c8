"""Forward hooks capture what a layer returned, even when the forward later overwrites it in place.

torchvision's ResNet follows every BatchNorm with `ReLU(inplace=True)`, and its BasicBlock adds
the shortcut with `out += identity` onto bn2's output. The reference here is torchvision's
resnet18 written out by hand: the same weights, BatchNorm by its formula, no in-place operation
and no hook.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from backdoor_lens.stats.activations import ReducingHooks, channel_view
from backdoor_lens.device import set_quiet
from backdoor_lens.errors import UserError
from backdoor_lens.stats.features import FeatureHooks, collect_features, layer_output

set_quiet(True)


def batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def conv(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, module.weight, module.bias, module.stride, module.padding)


@torch.no_grad()
def reference_resnet18(model, x) -> tuple[dict, torch.Tensor]:
    """({BN name: its output}, logits) of torchvision's resnet18, computed without in-place ops."""
    modules = dict(model.named_modules())
    outputs = {}

    def bn(name, t):
        outputs[name] = batch_norm(modules[name], t)
        return outputs[name]

    h = F.max_pool2d(torch.relu(bn("bn1", conv(model.conv1, x))), 3, 2, 1)
    for stage in range(1, 5):
        for block in (0, 1):
            prefix = f"layer{stage}.{block}"
            out = torch.relu(bn(f"{prefix}.bn1", conv(modules[f"{prefix}.conv1"], h)))
            out = bn(f"{prefix}.bn2", conv(modules[f"{prefix}.conv2"], out))
            identity = bn(f"{prefix}.downsample.1", conv(modules[f"{prefix}.downsample.0"], h)) \
                if f"{prefix}.downsample.0" in modules else h
            h = torch.relu(out + identity)
    return outputs, model.fc(h.mean((2, 3)))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.randn(n, generator=generator))
                module.bias.copy_(torch.randn(n, generator=generator))
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    model.eval()
    x = torch.randn(3, 3, 32, 32, generator=generator)
    reference, logits = reference_resnet18(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, rtol=1e-4, atol=1e-4)  # the reference is the same network
    norms = [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]
    assert set(reference) == set(norms) and len(norms) == 20
    return model, x, reference


def assert_matches(found, expected, name):
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_feature_hooks_keep_every_bn_output_of_resnet18(resnet):
    model, x, reference = resnet
    assert reference["layer4.1.bn2"].min() < 0 and reference["bn1"].min() < 0  # what a ReLU would erase
    with FeatureHooks(model, list(reference)) as hooks, torch.no_grad():
        model(x)
    for name, expected in reference.items():
        assert_matches(hooks.outputs[name], expected, name)


def test_collected_features_are_the_bn_output_not_the_relu_after_it(resnet):
    model, x, reference = resnet
    loader = [(x, torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.arange(3))]
    features = collect_features(model, loader, "layer4.1.bn2", torch.device("cpu"))[0]
    expected = reference["layer4.1.bn2"].flatten(1).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
    assert features.min() == pytest.approx(expected.min(), abs=1e-4)


def test_layer_output_is_the_bn_output_of_a_few_images(resnet):
    model, x, reference = resnet
    for name in ("bn1", "layer2.0.downsample.1", "layer4.1.bn2"):
        np.testing.assert_allclose(layer_output(model, x, name, torch.device("cpu")), reference[name].numpy(),
                                   rtol=1e-4, atol=1e-4)


def test_reducing_hooks_reduce_before_in_place_ops(resnet):
    model, x, reference = resnet
    with ReducingHooks(model, list(reference), lambda name, output: channel_view(output).amin(dim=2)) as hooks, \
            torch.inference_mode():
        model(x)
    for name, expected in reference.items():
        assert_matches(hooks.reduced[name], expected.flatten(2).amin(dim=2), name)


def test_a_module_run_twice_per_forward_is_refused(resnet):
    model, x, _ = resnet
    for hooks in (FeatureHooks(model, ["layer1.0.relu"]), ReducingHooks(model, ["layer1.0.relu"], lambda n, o: o.sum())):
        with hooks, torch.no_grad(), pytest.raises(UserError, match="'layer1.0.relu' runs more than once"):
            model(x)
    with FeatureHooks(model, ["relu"]) as hooks, torch.no_grad():  # the stem's ReLU runs once per forward
        model(x)
        model(x)
    assert_matches(hooks.outputs["relu"], torch.relu(batch_norm(model.bn1, conv(model.conv1, x))), "relu")
