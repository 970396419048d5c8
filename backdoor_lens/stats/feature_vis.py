"""Feature visualisation: images that maximise a channel's mean activation or a class logit.

The image is parametrised in a decorrelated Fourier basis (as in Olah et al., "Feature
Visualization", Distill 2017): a complex spectrum S (per colour channel, rfft layout) scaled by
1 / max(f, 1/size), so that low frequencies dominate; x = irfft2(S * scale) / 4, then a fixed
3x3 colour-decorrelation matrix (the square root of ImageNet's colour covariance, normalised) mixes
the channels, and a sigmoid maps to [0, 1]. Gradient ascent in this basis avoids the
high-frequency patterns that plain pixel optimisation produces.

Each step applies a random affine transform (rotation, scale, translation with reflection padding)
to the image before the model sees it, so that only features robust to them survive, and adds a
total-variation penalty: loss = -sum_i objective_i(model(normalize(T(x_i)))) + w_tv * sum_i TV(x_i),
TV(x) = mean |x[h+1,w] - x[h,w]| + mean |x[h,w+1] - x[h,w]|.

Objective: a channel's activation averaged over positions (conv output) or its value (linear
output), or a class logit. All images are optimised together in one batch (one forward per step).
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from backdoor_lens.device import progress
from backdoor_lens.models.layers import get_layer

# Square root of the colour covariance of natural images (lucid's constant), columns normalised
# to a largest norm of 1: decorrelated parameters map to correlated, natural-looking colours.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR_MIX = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()


class FourierImage(torch.nn.Module):
    """A batch of images in [0, 1], parametrised by decorrelated Fourier coefficients."""

    def __init__(self, batch: int, channels: int, height: int, width: int, init_std: float = 0.01,
                 generator: torch.Generator | None = None, decay: float = 1.0):
        super().__init__()
        self.shape = (batch, channels, height, width)
        fy = torch.fft.fftfreq(height)[:, None]
        fx = torch.fft.rfftfreq(width)[None, :]
        freqs = torch.sqrt(fx ** 2 + fy ** 2)
        self.register_buffer("scale", 1.0 / torch.clamp(freqs, min=1.0 / max(height, width)) ** decay)
        spectrum = torch.randn(batch, channels, height, width // 2 + 1, 2, generator=generator) * init_std
        self.spectrum = torch.nn.Parameter(spectrum)

    def forward(self) -> torch.Tensor:
        coefficients = torch.view_as_complex(self.spectrum) * self.scale
        x = torch.fft.irfftn(coefficients, s=self.shape[2:], norm="ortho") / 4.0
        if self.shape[1] == 3:
            x = torch.einsum("nchw,dc->ndhw", x, COLOR_MIX.to(x))
        return torch.sigmoid(x)


def random_affine(x: torch.Tensor, generator: torch.Generator, rotate_deg: float, scale: tuple,
                  jitter_px: float) -> torch.Tensor:
    """Each image rotated, scaled and shifted at random (bilinear, reflection at the borders)."""
    n, _, h, w = x.shape

    def uniform(low, high):
        return torch.rand(n, generator=generator) * (high - low) + low

    angle = uniform(-rotate_deg, rotate_deg) * math.pi / 180
    s = uniform(*scale)
    tx, ty = uniform(-jitter_px, jitter_px) * 2 / w, uniform(-jitter_px, jitter_px) * 2 / h
    theta = torch.stack([torch.stack([s * torch.cos(angle), -s * torch.sin(angle), tx], 1),
                         torch.stack([s * torch.sin(angle), s * torch.cos(angle), ty], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per image: mean absolute difference of vertical plus horizontal neighbours."""
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).mean(1)
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(1)
    return dy + dx


@dataclass
class Objective:
    kind: str  # "channel" (of the hooked layer) or "logit"
    index: int

    def label(self, class_names=None) -> str:
        if self.kind == "logit":
            return f"class {class_names[self.index] if class_names else self.index}"
        return f"channel {self.index}"


@dataclass
class FeatureVisResult:
    images: np.ndarray  # N x C x H x W in [0, 1]
    initial: np.ndarray  # objective on the starting image (untransformed)
    final: np.ndarray  # objective on the final image (untransformed)
    history: np.ndarray  # steps x N: objective during optimisation (on transformed images)


def _objective_values(model, layer_module, objectives, x):
    captured = {}
    # clone: an in-place op after the layer (torchvision's BN -> ReLU(inplace=True)) would otherwise
    # overwrite the captured output, and we would maximise ReLU(BN) instead of the BN (clone keeps the graph).
    handle = layer_module.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o.clone())) \
        if layer_module is not None else None
    try:
        logits = model(x)
    finally:
        if handle is not None:
            handle.remove()
    values = []
    for i, objective in enumerate(objectives):
        if objective.kind == "logit":
            values.append(logits[i, objective.index])
        else:
            out = captured["out"][i, objective.index]
            values.append(out.mean())
    return torch.stack(values)


def compute_feature_visualisation(model, objectives, layer: str | None, image_shape: tuple, normalize,
                                  steps: int = 256, lr: float = 0.05, tv_weight: float = 0.5,
                                  rotate_deg: float = 10.0, scale: tuple = (0.9, 1.1), jitter_frac: float = 0.06,
                                  seed: int = 0, device=None, desc: str = "feature visualisation") -> FeatureVisResult:
    """Optimise one image per objective (see module doc). image_shape: (C, H, W) of the model input;
    normalize: [0, 1] pixels -> model input. jitter_frac: largest shift as a fraction of the width."""
    device = device or next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    channels, height, width = image_shape
    param = FourierImage(len(objectives), channels, height, width, generator=generator).to(device)
    layer_module = get_layer(model, layer) if layer and any(o.kind == "channel" for o in objectives) else None
    optimizer = torch.optim.Adam(param.parameters(), lr=lr)
    was_training = model.training
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # only the image is optimised: no weight gradients
    history = []
    try:
        with torch.no_grad():
            initial = _objective_values(model, layer_module, objectives, normalize(param())).cpu().numpy()
        for _ in progress(range(steps), desc):
            optimizer.zero_grad()
            image = param()
            seen = random_affine(image, generator, rotate_deg, scale, jitter_frac * width)
            values = _objective_values(model, layer_module, objectives, normalize(seen))
            loss = -values.sum() + tv_weight * total_variation(image).sum()
            loss.backward()
            optimizer.step()
            history.append(values.detach().cpu().numpy())
        with torch.no_grad():
            image = param()
            final = _objective_values(model, layer_module, objectives, normalize(image)).cpu().numpy()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return FeatureVisResult(image.detach().cpu().numpy(), initial, final,
                            np.asarray(history) if history else np.zeros((0, len(objectives))))
