"""Attribution methods behind one call: the grad-cam package's CAMs and a registry of Captum methods.

`compute_cam(model, layer, x, targets, method)` -> N x H x W (the grad-cam package, which
min-max scales each map to [0, 1]). `Attributor(model, ...).attribute(method, x, targets)` ->
N x C x H x W (pixel methods) or N x 1 x H x W (gradcam, upsampled), in model-input space.
Each Captum method is one small `Explainer` (name + explain) in the `METHODS` registry; the
perturbation methods (feature ablation and permutation, Shapley value sampling, LIME, KernelSHAP)
act on a grid of superpixels (`superpixel_mask`).

Guided backprop, deconvolution, guided Grad-CAM, DeepLift, DeepLiftSHAP and LRP act on ReLU
*modules*: they replace a ReLU module's backward pass. Our PreAct-ResNet-18 (like BackdoorBench's)
calls `F.relu` in `forward`, which those hooks never see: guided backprop would silently return
the plain gradient and DeepLift the gradient x (input - baseline) of a network it treats as
linear. So those methods run on a copy of the model traced with torch.fx, in which every relu
(functional, method, or module, in place or not, reused or not) is its own non-in-place
`nn.ReLU`, and in-place additions (torchvision's `out += identity`) are plain additions. The copy
computes exactly the same function (tested). When a model cannot be traced, they run on the
original with a printed note.
"""
import abc
import contextlib
import copy
import io
import operator
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from backdoor_lens.errors import UserError
from backdoor_lens.models.layers import get_layer

# --- the grad-cam package ----------------------------------------------------------------------
CAM_METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "eigencam": "EigenCAM",
               "layercam": "LayerCAM", "scorecam": "ScoreCAM", "ablationcam": "AblationCAM", "fullgrad": "FullGrad"}


def compute_cam(model: nn.Module, layer_name: str, x: torch.Tensor, targets, method: str = "gradcam",
                batch_size: int = 32, quiet: bool = True) -> np.ndarray:
    """CAM maps N x H x W in [0, 1] explaining class targets[i] of image x[i].

    FullGrad ignores the layer (it uses every bias of the network, by its definition).
    """
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in CAM_METHODS:
        raise UserError(f"unknown --cam_method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    cls = getattr(pytorch_grad_cam, CAM_METHODS[method])
    layers = [] if method == "fullgrad" else [get_layer(model, layer_name)]
    device = next(model.parameters()).device
    maps = []
    # ScoreCAM and AblationCAM draw their own progress bars; --quiet silences them.
    silence = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
    with cls(model=model, target_layers=layers) as cam, silence:
        cam.batch_size = batch_size
        for start in range(0, len(x), batch_size):
            chunk = x[start:start + batch_size].to(device)
            chunk_targets = [ClassifierOutputTarget(int(t)) for t in targets[start:start + batch_size]]
            maps.append(np.asarray(cam(input_tensor=chunk, targets=chunk_targets), dtype=np.float32))
    model.zero_grad(set_to_none=True)
    return np.concatenate(maps) if maps else np.zeros((0,) + tuple(x.shape[-2:]), np.float32)


# --- ReLU modules for Captum's rule-based methods ---------------------------------------------
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}


def with_relu_modules(model: nn.Module) -> tuple[nn.Module, str | None]:
    """A copy of `model` where each relu is its own `nn.ReLU(inplace=False)` (see module doc).

    Returns (model, None) or (copy of the original, why it could not be traced).
    """
    import torch.fx as fx

    original = copy.deepcopy(model).eval()
    try:
        traced = fx.symbolic_trace(original)
    except Exception as error:  # data-dependent control flow and the like
        return original, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    count = 0
    for node in list(traced.graph.nodes):
        is_relu = (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or \
                  (node.op == "call_method" and node.target in ("relu", "relu_")) or \
                  (node.op == "call_module" and isinstance(traced.get_submodule(node.target), nn.ReLU))
        if is_relu:
            name = f"lens_relu_{count}"
            count += 1
            traced.add_module(name, nn.ReLU(inplace=False))
            with traced.graph.inserting_after(node):
                replacement = traced.graph.call_module(name, (node.args[0],))
            node.replace_all_uses_with(replacement)
            traced.graph.erase_node(node)
        elif node.op == "call_function" and node.target is operator.iadd:
            node.target = operator.add
    traced.graph.lint()
    traced.recompile()
    return traced.eval(), None


# --- Captum methods ----------------------------------------------------------------------------
@dataclass
class Options:
    layer_name: str | None = None  # for gradcam and guided_gradcam
    baseline: torch.Tensor | None = None  # 1 x C x H x W model input: IG and DeepLift start here
    # GradientSHAP and DeepLiftSHAP draw their baselines from the baseline and background_size - 1
    # seeded copies of it plus N(0, 1) noise: the data's scale, as model input is normalised
    background_size: int = 8
    smooth_samples: int = 16  # SmoothGrad's noisy copies and GradientSHAP's samples per image
    smooth_noise: float = 0.15  # SmoothGrad's sigma as a share of the input's value range
    ig_steps: int = 32
    occlusion_window: int | None = None  # default: an eighth of the image side (at least 2)
    occlusion_stride: int | None = None  # default: 1
    superpixel: int | None = None  # cell side of the perturbation methods' features; default: image side / 8
    perturbation_samples: int = 200  # KernelSHAP's and LIME's coalitions per image
    shapley_permutations: int = 4  # Shapley value sampling's feature orders per image
    batch_size: int = 64
    seed: int = 0  # the sampling methods draw from torch's generator, seeded with this for every call


class Skipped(Exception):
    """A method that this model's layers (or this batch) do not allow; the message says why."""


def _baseline(x, opts):
    return torch.zeros_like(x) if opts.baseline is None else opts.baseline.to(x.device).expand_as(x)


def _background(x, opts):
    base = _baseline(x[:1], opts)
    noise = torch.randn((max(2, opts.background_size) - 1,) + tuple(x.shape[1:]),
                        generator=torch.Generator().manual_seed(opts.seed)).to(x.device)
    return torch.cat([base, base + noise])


def _per_eval(x, opts) -> int:
    """Perturbed copies per forward pass, so that a pass holds about batch_size images."""
    return max(1, opts.batch_size // max(1, len(x)))


def superpixel_side(size, opts) -> int:
    return opts.superpixel or max(1, round(min(size) / 8))


def superpixel_mask(size, side: int) -> torch.Tensor:
    """H x W feature ids of a regular grid of side x side cells, row by row (the last row and column
    of cells may be narrower). A grid, not SLIC superpixels: SLIC would need scikit-image, which is
    not a dependency, and on 32 x 32 images a 4 x 4 grid (64 features) already holds a BadNets
    patch in one or a few cells."""
    h, w = size
    rows = torch.arange(h) // side
    cols = torch.arange(w) // side
    return rows[:, None] * int((w + side - 1) // side) + cols[None, :]


class Explainer(abc.ABC):
    """One attribution method. `explain(attributor, x, t, opts)` explains class t[i] of input x[i]
    (model-input space, requires grad) and returns N x C x H x W (Grad-CAM: N x 1 x H x W).
    Rule-based methods run on `attributor.relu_model()` (see the module doc)."""

    name: str

    @abc.abstractmethod
    def explain(self, attributor, x: torch.Tensor, t: torch.Tensor, opts: Options) -> torch.Tensor:
        ...


class Saliency(Explainer):
    name = "saliency"

    def explain(self, attributor, x, t, opts):
        from captum.attr import Saliency as CaptumSaliency
        return CaptumSaliency(attributor.model).attribute(x, target=t, abs=True)


class SmoothGrad(Explainer):
    name = "smoothgrad"

    def explain(self, attributor, x, t, opts):
        from captum.attr import NoiseTunnel, Saliency as CaptumSaliency
        sigma = opts.smooth_noise * float(x.max() - x.min())
        return NoiseTunnel(CaptumSaliency(attributor.model)).attribute(
            x, nt_type="smoothgrad", nt_samples=opts.smooth_samples, stdevs=sigma, target=t, abs=True,
            nt_samples_batch_size=_per_eval(x, opts))


class IntegratedGradients(Explainer):
    name = "integrated_gradients"

    def explain(self, attributor, x, t, opts):
        from captum.attr import IntegratedGradients as CaptumIG
        return CaptumIG(attributor.model).attribute(x, baselines=_baseline(x, opts), target=t, n_steps=opts.ig_steps,
                                                    internal_batch_size=opts.batch_size)


def occlusion_geometry(size, opts) -> tuple[int, int]:
    window = opts.occlusion_window or max(2, round(min(size) / 8))
    # Stride 1: with a coarser stride neighbouring pixels share one score, and a patch at the
    # image's edge ties with pixels just outside it (measured on the demo: pointing 0.5 at stride 2,
    # 1.0 at stride 1).
    stride = opts.occlusion_stride or 1
    return window, stride


class Occlusion(Explainer):
    name = "occlusion"

    def explain(self, attributor, x, t, opts):
        from captum.attr import Occlusion as CaptumOcclusion
        window, stride = occlusion_geometry(x.shape[-2:], opts)
        channels = x.shape[1]
        # baseline 0 in model-input space: the dataset's mean colour
        return CaptumOcclusion(attributor.model).attribute(
            x, sliding_window_shapes=(channels, window, window), strides=(channels, stride, stride), baselines=0.0,
            target=t, perturbations_per_eval=_per_eval(x, opts))


class GuidedBackprop(Explainer):
    name = "guided_backprop"

    def explain(self, attributor, x, t, opts):
        from captum.attr import GuidedBackprop as CaptumGuidedBackprop
        return CaptumGuidedBackprop(attributor.relu_model()).attribute(x, target=t)


class Deconvolution(Explainer):
    name = "deconvolution"

    def explain(self, attributor, x, t, opts):
        from captum.attr import Deconvolution as CaptumDeconvolution
        return CaptumDeconvolution(attributor.relu_model()).attribute(x, target=t)


class DeepLift(Explainer):
    name = "deeplift"

    def explain(self, attributor, x, t, opts):
        from captum.attr import DeepLift as CaptumDeepLift
        return CaptumDeepLift(attributor.relu_model()).attribute(x, baselines=_baseline(x, opts), target=t)


class DeepLiftShap(Explainer):
    """DeepLift averaged over the background's baselines (each image against every one)."""
    name = "deeplift_shap"

    def explain(self, attributor, x, t, opts):
        from captum.attr import DeepLiftShap as CaptumDeepLiftShap
        return CaptumDeepLiftShap(attributor.relu_model()).attribute(x, baselines=_background(x, opts), target=t)


class GradientShap(Explainer):
    """Expected gradients: gradient x (input - baseline) at random points between the input and
    baselines drawn from the background, smooth_samples per image."""
    name = "gradient_shap"

    def explain(self, attributor, x, t, opts):
        from captum.attr import GradientShap as CaptumGradientShap
        return CaptumGradientShap(attributor.model).attribute(x, baselines=_background(x, opts), target=t,
                                                              n_samples=opts.smooth_samples)


class InputXGradient(Explainer):
    name = "input_x_gradient"

    def explain(self, attributor, x, t, opts):
        from captum.attr import InputXGradient as CaptumInputXGradient
        return CaptumInputXGradient(attributor.model).attribute(x, target=t)


class GradCam(Explainer):
    name = "gradcam"

    def explain(self, attributor, x, t, opts):
        from captum.attr import LayerAttribution, LayerGradCam
        if not opts.layer_name:
            raise Skipped("gradcam needs a layer")
        layer = get_layer(attributor.model, opts.layer_name)
        cam = LayerGradCam(attributor.model, layer).attribute(x, target=t, relu_attributions=True)
        return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")


class GuidedGradCam(Explainer):
    """Guided backprop times the layer's Grad-CAM upsampled to the input."""
    name = "guided_gradcam"

    def explain(self, attributor, x, t, opts):
        from captum.attr import GuidedGradCam as CaptumGuidedGradCam
        if not opts.layer_name:
            raise Skipped("guided_gradcam needs a layer")
        model = attributor.relu_model()
        return CaptumGuidedGradCam(model, get_layer(model, opts.layer_name)).attribute(
            x, target=t, interpolate_mode="bilinear")


LRP_EPSILON = 0.25


class Lrp(Explainer):
    """LRP-epsilon (epsilon 0.25) on convolutions, linear and pooling layers; BatchNorm passes relevance
    through unchanged. Captum's default (epsilon 1e-9 everywhere, BatchNorm included) divides by
    near-zero pre-activations in residual networks: on the demo PreAct-ResNet-18 its relevance summed
    to 1e7..1e11 for logits of 20..35. A result whose relevance is not conserved within a factor of
    10 of the explained logit is refused (Skipped) rather than shown."""
    name = "lrp"

    def explain(self, attributor, x, t, opts):
        from captum.attr import LRP
        from captum.attr._utils.lrp_rules import EpsilonRule, IdentityRule
        model = attributor.relu_model()
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.rule = IdentityRule()
            elif isinstance(module, (nn.Conv2d, nn.Linear, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d)):
                module.rule = EpsilonRule(epsilon=LRP_EPSILON)
        try:
            relevance = LRP(model).attribute(x, target=t)
        except TypeError as error:  # captum: "Module of type X has no rule defined ..."
            raise Skipped(f"LRP has no rule for a layer of this model ({str(error).split(' has no rule')[0]})") from None
        finally:
            for module in model.modules():
                if hasattr(module, "rule"):
                    del module.rule
        with torch.no_grad():
            logit = model(x.detach()).gather(1, t[:, None])[:, 0].abs()
        total = relevance.detach().flatten(1).sum(1).abs()
        if not torch.isfinite(total).all() or ((total > 10 * logit + 1) | (total < logit / 10 - 1)).any():
            raise Skipped(f"LRP relevance is not conserved on this model (sums {total.min().item():.3g}.."
                          f"{total.max().item():.3g} for logits {logit.min().item():.3g}..{logit.max().item():.3g})")
        return relevance


# Perturbation methods switch superpixels (grid cells, all channels together) between the image and
# the baseline 0 in model-input space, the dataset's mean colour (as occlusion does): one model
# evaluation per coalition instead of one per pixel, so they finish at the suite's image counts.
def _feature_mask(x, opts) -> torch.Tensor:
    side = superpixel_side(x.shape[-2:], opts)
    return superpixel_mask(tuple(x.shape[-2:]), side).to(x.device).expand(1, x.shape[1], -1, -1).contiguous()


class FeatureAblation(Explainer):
    """Score drop when one superpixel is replaced by the baseline."""
    name = "feature_ablation"

    def explain(self, attributor, x, t, opts):
        from captum.attr import FeatureAblation as CaptumFeatureAblation
        return CaptumFeatureAblation(attributor.model).attribute(
            x, baselines=0.0, target=t, feature_mask=_feature_mask(x, opts), perturbations_per_eval=_per_eval(x, opts))


class FeaturePermutation(Explainer):
    """Score drop when one superpixel is exchanged between the images of the batch (a random
    permutation): a trigger that sits in the same place in every image is exchanged for itself,
    so this method sees it only where the batch mixes triggered and clean images."""
    name = "feature_permutation"

    def explain(self, attributor, x, t, opts):
        from captum.attr import FeaturePermutation as CaptumFeaturePermutation
        if len(x) < 2:
            raise Skipped("feature_permutation exchanges features between images and needs at least two")
        return CaptumFeaturePermutation(attributor.model).attribute(
            x, target=t, feature_mask=_feature_mask(x, opts), perturbations_per_eval=_per_eval(x, opts))


class ShapleyValueSampling(Explainer):
    """Shapley values of the superpixels, averaged over shapley_permutations random orders."""
    name = "shapley_value_sampling"

    def explain(self, attributor, x, t, opts):
        from captum.attr import ShapleyValueSampling as CaptumShapleyValueSampling
        return CaptumShapleyValueSampling(attributor.model).attribute(
            x, baselines=0.0, target=t, feature_mask=_feature_mask(x, opts), n_samples=opts.shapley_permutations,
            perturbations_per_eval=_per_eval(x, opts))


class Lime(Explainer):
    """A sparse linear model (Captum's default, Lasso) of the score on perturbation_samples random
    superpixel coalitions per image, weighted by their similarity to the image."""
    name = "lime"

    def explain(self, attributor, x, t, opts):
        from captum.attr import Lime as CaptumLime
        return CaptumLime(attributor.model).attribute(
            x, baselines=0.0, target=t, feature_mask=_feature_mask(x, opts), n_samples=opts.perturbation_samples,
            perturbations_per_eval=opts.batch_size)


class KernelShap(Explainer):
    """Shapley values of the superpixels from a linear model fitted on perturbation_samples coalitions
    per image with the Shapley kernel's weights."""
    name = "kernel_shap"

    def explain(self, attributor, x, t, opts):
        from captum.attr import KernelShap as CaptumKernelShap
        return CaptumKernelShap(attributor.model).attribute(
            x, baselines=0.0, target=t, feature_mask=_feature_mask(x, opts), n_samples=opts.perturbation_samples,
            perturbations_per_eval=opts.batch_size)


EXPLAINERS = (Saliency(), SmoothGrad(), IntegratedGradients(), Occlusion(), GuidedBackprop(), DeepLift(),
              InputXGradient(), GradCam(), Lrp(), DeepLiftShap(), GradientShap(), Deconvolution(), GuidedGradCam(),
              FeatureAblation(), FeaturePermutation(), ShapleyValueSampling(), Lime(), KernelShap())
METHODS = {explainer.name: explainer for explainer in EXPLAINERS}
DEFAULT_METHODS = ("saliency", "smoothgrad", "integrated_gradients", "occlusion", "guided_backprop", "deeplift",
                   "input_x_gradient", "gradcam", "lrp")
# Casper et al. scored "16 feature attribution methods from Captum": Captum's primary attribution
# algorithms, which are exactly these 16 (NoiseTunnel's SmoothGrad is a wrapper, LayerGradCam a
# layer method).
CASPER_METHODS = ("integrated_gradients", "saliency", "deeplift", "deeplift_shap", "gradient_shap", "input_x_gradient",
                  "guided_backprop", "guided_gradcam", "deconvolution", "feature_ablation", "occlusion",
                  "feature_permutation", "shapley_value_sampling", "lime", "kernel_shap", "lrp")
METHOD_SETS = {"casper": CASPER_METHODS}


def parse_methods(text: str) -> list[str]:
    """Comma-separated method names and set names (`casper`) -> method names, in order, once each."""
    names = []
    for name in (n.strip() for n in str(text).split(",")):
        if name:
            names += METHOD_SETS.get(name, (name,))
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise UserError(f"unknown --methods {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(METHODS)}, or {', '.join(METHOD_SETS)} for Casper et al.'s set")
    return list(dict.fromkeys(names))


class Attributor:
    """Captum attributions of one model; the ReLU-module copy is built once, when first needed."""

    def __init__(self, model: nn.Module, options: Options | None = None):
        self.model = model.eval()
        self.options = options or Options()
        self._relu_model = None
        self.notes: list[str] = []

    def relu_model(self) -> nn.Module:
        if self._relu_model is None:
            self._relu_model, why = with_relu_modules(self.model)
            if why:
                self.notes.append(f"the model could not be traced ({why}); the rule-based methods (guided backprop, "
                                  f"deconvolution, guided Grad-CAM, DeepLift, DeepLiftSHAP, LRP) see only its ReLU "
                                  f"modules, not functional relu calls")
        return self._relu_model

    def attribute(self, method: str, x: torch.Tensor, targets) -> torch.Tensor:
        """Attribution of class targets[i] for image x[i]: N x C x H x W (gradcam: N x 1 x H x W)."""
        if method not in METHODS:
            raise UserError(f"unknown attribution method {method!r}; choose from {', '.join(METHODS)}")
        device = next(self.model.parameters()).device
        x = x.to(device).detach().requires_grad_(True)
        t = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=device)
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            # captum announces the hooks it sets on ReLU modules, that inputs need gradients, and that
            # LIME and KernelSHAP fit one model per image of a batch
            warnings.simplefilter("ignore", UserWarning)
            torch.manual_seed(self.options.seed)
            out = METHODS[method].explain(self, x, t, self.options)
        self.model.zero_grad(set_to_none=True)
        return out.detach()


# --- the class a map explains, predictions, CAM layers -----------------------------------------
TARGET_CHOICES = ("predicted", "true", "target")


def explained_classes(mode: str, predicted, original_labels, target_class) -> np.ndarray:
    """The class each map explains: the prediction, the image's true (original) class, or the attack target."""
    if mode == "predicted":
        return np.asarray(predicted, dtype=np.int64)
    if mode == "true":
        return np.asarray(original_labels, dtype=np.int64)
    if mode == "target":
        if target_class is None:
            raise UserError("--target target needs the attack's target class, which this record does not name "
                            "(clean or all-to-all); pass --target_class or use --target predicted")
        return np.full(len(predicted), int(target_class), dtype=np.int64)
    raise UserError(f"unknown --target {mode!r}; choose one of {', '.join(TARGET_CHOICES)}")


@torch.no_grad()
def predict_batch(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, softmax probabilities N x K) of a stack of inputs."""
    device = next(model.parameters()).device
    probs = torch.cat([torch.softmax(model(x[i:i + batch_size].to(device)).float(), 1).cpu()
                       for i in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0, 1)
    return probs.argmax(1).numpy(), probs.numpy()


def stage_layers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The last convolution at each spatial resolution, in execution order (one forward pass)."""
    seen = []
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: seen.append((n, tuple(o.shape[-2:]))))
               for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x[:1].to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    last = {}
    for name, size in seen:
        last.pop(size, None)
        last[size] = name
    order = {name: i for i, (name, _) in enumerate(seen)}
    return sorted(last.values(), key=order.get)
