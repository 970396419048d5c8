"""Frequency saliency: the Fourier spectrum of the input gradient, clean vs poisoned images.

For image x and class k (--target), g = d f_k(x) / d x (model-input space, C x H x W). Its
spectrum is P(u, v) = sum_c |FFT2(g_c)(u, v)|^2, centred (fftshift, zero frequency in the
middle) and shown as log10(sqrt(P) + eps) with eps = 1e-8 max sqrt(P) (never the log of zero).
The radial energy profile E(r) sums P over the ring of integer radius r around the centre; the
low-frequency share is the energy at normalised radius r / (min(H, W) / 2) <= --low_cutoff, the
high-frequency share the rest. A patch trigger makes the model's gradient a small, sharp blob:
broad, high-frequency spectra. The |g| map (summed over channels) of every poisoned image is
also scored against its trigger footprint (backdoor_lens/attribution/footprint.py). Titles say clean or poisoned
from each sample's poison flag.
"""
from dataclasses import dataclass

import numpy as np
import torch

from backdoor_lens.analysis import Analysis
from backdoor_lens.attribution.explainers import TARGET_CHOICES
from backdoor_lens.attribution.footprint import reduce_map
from backdoor_lens.attribution.pipeline import (DEFAULT_SPLIT, SPLITS, Classes, Images, Localise,
                                                add_localisation_arguments, choose, classes, print_note, save_pages,
                                                score, write_localisation)
from backdoor_lens.errors import UserError
from backdoor_lens.plot.attribution import fre_pages, fre_profiles_figure
from backdoor_lens.report.numbers import localisation_numbers


def add_arguments(parser):
    parser.add_argument("--num_images", type=int, default=4, help="clean and poisoned images analysed (each)")
    parser.add_argument("--target", default="predicted", choices=TARGET_CHOICES,
                        help="class whose score is differentiated: prediction, true class, or the attack target")
    parser.add_argument("--low_cutoff", type=float, default=0.5,
                        help="normalised radius (1 = Nyquist along the shorter side) that ends the low frequencies")
    add_localisation_arguments(parser)


@dataclass(frozen=True)
class Settings:
    num_images: int
    target: str
    low_cutoff: float
    batch_size: int
    localise: Localise


def settings(args) -> Settings:
    if args.num_images < 0:
        raise UserError("--num_images must not be negative")
    if not 0 < args.low_cutoff < 1.5:
        raise UserError(f"--low_cutoff {args.low_cutoff} must lie in (0, 1.5)")
    return Settings(args.num_images, args.target, args.low_cutoff, args.batch_size,
                    Localise(args.topk_percent, args.footprint_tolerance, args.seed))


@dataclass
class Spectra:
    """The radial profiles and log spectra of one group of images (clean or poisoned)."""
    images: int
    low_share: float  # mean low-frequency share of the gradient energy
    profile_mean: np.ndarray  # R: mean energy share per radius
    profile_min: np.ndarray
    profile_max: np.ndarray
    logmag_mean: np.ndarray  # H x W: mean log10 magnitude of the centred spectrum


@dataclass
class FrequencyResult:
    images: Images  # as many clean as poisoned images
    model: str  # "attack" or "defense"
    target: str
    low_cutoff: float
    classes: Classes
    saliency: np.ndarray  # N x H x W: |gradient| summed over channels
    logmag: np.ndarray  # N x H x W: log10 |FFT| of the gradient, centred
    profile: np.ndarray  # N x R: energy share per integer radius
    radius: np.ndarray  # R: the normalised radius of each bin (1 = Nyquist along the shorter side)
    low: np.ndarray  # N: low-frequency share
    energy: np.ndarray  # N: gradient energy sum g^2
    groups: dict  # {"clean"/"poisoned": Spectra}, the groups present
    rows: list  # localisation rows of the |gradient| map of each poisoned image
    record: str
    class_names: tuple


def input_gradients(model, x: torch.Tensor, targets, batch_size: int = 64) -> torch.Tensor:
    """d f_{targets[i]}(x_i) / d x_i for every image: N x C x H x W (on the CPU)."""
    device = next(model.parameters()).device
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    out = []
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size].to(device).requires_grad_(True)
        scores = model(xb).gather(1, targets[s:s + batch_size, None].to(device)).sum()
        out.append(torch.autograd.grad(scores, xb)[0].detach().cpu())
    return torch.cat(out) if out else torch.zeros_like(x)


def power_spectrum(gradients: torch.Tensor) -> np.ndarray:
    """N x C x H x W -> N x H x W: sum over channels of |FFT2|^2, zero frequency at the centre."""
    spectrum = torch.fft.fft2(gradients.double())
    power = (spectrum.abs() ** 2).sum(dim=1)
    return torch.fft.fftshift(power, dim=(-2, -1)).numpy()


def log_magnitude(power: np.ndarray) -> np.ndarray:
    """log10(sqrt(P) + eps), eps = 1e-8 of each map's largest magnitude (1e-30 for an all-zero map)."""
    magnitude = np.sqrt(power)
    peak = magnitude.reshape(len(magnitude), -1).max(axis=1)
    eps = np.maximum(peak * 1e-8, 1e-30)[:, None, None]
    return np.log10(magnitude + eps)


def radii(size) -> np.ndarray:
    """Integer distance of every frequency from the centre of an fftshift-ed H x W spectrum."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    return np.rint(np.hypot(yy - h // 2, xx - w // 2)).astype(np.int64)


def radial_profile(power: np.ndarray) -> np.ndarray:
    """N x H x W centred power -> N x R energy share per integer radius (rows sum to 1)."""
    r = radii(power.shape[-2:]).ravel()
    n_bins = r.max() + 1
    energy = np.stack([np.bincount(r, weights=p.ravel(), minlength=n_bins) for p in power])
    total = energy.sum(axis=1, keepdims=True)
    return np.divide(energy, total, out=np.zeros_like(energy), where=total > 0)


def low_frequency_share(profile: np.ndarray, size, cutoff: float) -> np.ndarray:
    radius = np.arange(profile.shape[1]) / (min(size) / 2)
    return profile[:, radius <= cutoff].sum(axis=1)


def compute(ctx, settings: Settings) -> FrequencyResult:
    s = settings
    images = choose(ctx, s.num_images, s.num_images, s.localise)
    model = ctx.model
    found = classes(ctx, model, images, s.target, s.batch_size)
    grads = input_gradients(model, images.x, found.explained, s.batch_size)
    power = power_spectrum(grads)
    logmag = log_magnitude(power)
    profile = radial_profile(power)
    low = low_frequency_share(profile, images.size, s.low_cutoff)
    saliency = reduce_map(grads, images.size)
    groups = {kind: Spectra(int(sel.sum()), float(low[sel].mean()), profile[sel].mean(axis=0), profile[sel].min(axis=0),
                            profile[sel].max(axis=0), logmag[sel].mean(axis=0))
              for kind, sel in (("clean", ~images.poison), ("poisoned", images.poison)) if sel.any()}
    rows = score(images, {"input_gradient": saliency}, images.meta(ctx.model_label, found.explained, found.predicted),
                 s.localise)
    return FrequencyResult(images=images, model=ctx.model_label, target=s.target, low_cutoff=s.low_cutoff,
                           classes=found, saliency=saliency, logmag=logmag, profile=profile,
                           radius=np.arange(profile.shape[1]) / (min(images.size) / 2), low=low,
                           energy=np.array([float((g ** 2).sum()) for g in grads]), groups=groups, rows=rows,
                           record=ctx.record.name, class_names=ctx.class_names)


def write(result: FrequencyResult, ctx) -> dict:
    images, found = result.images, result.classes
    print_note(images)
    save_pages(ctx.out, fre_pages(images, found, result.saliency, result.logmag, result.low, result.class_names,
                                  result.model, result.record), "fre_maps")
    ctx.out.save_figure(fre_profiles_figure(result.groups, result.radius, result.low_cutoff, result.record),
                        "fre_radial_profile")
    long_rows, share_rows = [], []
    for i, p in enumerate(images.positions):
        base = [int(p), int(images.original_index[i]), int(images.poison[i]), int(images.labels[i]),
                int(images.original_labels[i]), int(found.predicted[i]), int(found.explained[i])]
        share_rows.append(base + [float(result.low[i]), float(1 - result.low[i]), float(result.energy[i])])
        long_rows += [base + [r, float(result.radius[r]), float(result.profile[i, r])]
                      for r in range(result.profile.shape[1])]
    head = ["position", "original_index", "poisoned", "label", "original_label", "predicted", "explained"]
    ctx.out.save_csv("fre_radial_profile", long_rows, header=head + ["radius", "normalised_radius", "energy_share"])
    ctx.out.save_csv("fre_energy_share", share_rows,
                     header=head + ["low_frequency_share", "high_frequency_share", "gradient_energy"])
    summary = {"split": images.split.name, "model": result.model, "target": result.target,
               "low_cutoff": result.low_cutoff, "clean_images": images.n_clean,
               "poisoned_images": int(len(images.poisoned)), "note": images.note}
    for kind, group in result.groups.items():
        summary[f"low_frequency_share_{kind}"] = group.low_share
        print(f"{kind} images ({group.images}): mean low-frequency share of gradient energy "
              f"{group.low_share:.3f}, high {1 - group.low_share:.3f}")
    write_localisation(ctx.out, "fre", result.rows,
                       [("input_gradient", f"{result.model} model, |gradient| map", {"model": result.model})], summary)
    return summary


ANALYSIS = Analysis(
    name="fre", title="Frequency saliency", order=11,
    guide="Fourier magnitude of the input gradient; triggers with high-frequency content shift energy outwards.",
    shows="the Fourier magnitude of the input gradient (frequency saliency)",
    compute=compute, write=write, settings=settings, add_arguments=add_arguments, key_numbers=localisation_numbers,
    splits=SPLITS, default_split=DEFAULT_SPLIT, on_blended_demo=True, quick_args=("--num_images", "1"))
