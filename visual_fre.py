"""Frequency saliency: the Fourier spectrum of the input gradient, clean vs poisoned images.

For image x and class k (--target), g = d f_k(x) / d x (model-input space, C x H x W). Its
spectrum is P(u, v) = sum_c |FFT2(g_c)(u, v)|^2, centred (fftshift, zero frequency in the
middle) and shown as log10(sqrt(P) + eps) with eps = 1e-8 max sqrt(P) (never the log of zero).
The radial energy profile E(r) sums P over the ring of integer radius r around the centre; the
low-frequency share is the energy at normalised radius r / (min(H, W) / 2) <= --low_cutoff, the
high-frequency share the rest. A patch trigger makes the model's gradient a small, sharp blob:
broad, high-frequency spectra. The |g| map (summed over channels) of every poisoned image is
also scored against its trigger footprint (utils/footprint.py). Titles say clean or poisoned
from each sample's poison flag.
"""
import numpy as np
import torch

from utils.attribution import (choose_images, TARGET_CHOICES, explained_classes, image_title, pages,
                               predict_batch, short, show_heatmap, table_figure)
from utils.cli import main
from utils.context import load_context
from utils.errors import UserError
from utils.footprint import (add_localisation_arguments, check_localisation_arguments, describe, draw_footprint,
                             reduce_map, score_maps, save_localisation, split_footprints)
from utils.plotting import plt, show_image

DEMO_ARGS = []


def add_arguments(parser):
    parser.add_argument("--num_images", type=int, default=4, help="clean and poisoned images analysed (each)")
    parser.add_argument("--target", default="predicted", choices=TARGET_CHOICES,
                        help="class whose score is differentiated: prediction, true class, or the attack target")
    parser.add_argument("--low_cutoff", type=float, default=0.5,
                        help="normalised radius (1 = Nyquist along the shorter side) that ends the low frequencies")
    add_localisation_arguments(parser)


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


def run(args) -> dict:
    if args.num_images < 0:
        raise UserError("--num_images must not be negative")
    if not 0 < args.low_cutoff < 1.5:
        raise UserError(f"--low_cutoff {args.low_cutoff} must lie in (0, 1.5)")
    tolerance = check_localisation_arguments(args)
    with load_context(args, "fre", split=None) as ctx:
        split, note, clean_pos, bd_pos, positions = choose_images(ctx, args.num_images, args.num_images, args.seed)
        model = ctx.model
        x = split.batch(positions)[0]
        predicted, probs = predict_batch(model, x, args.batch_size)
        explained = explained_classes(args.target, predicted, split.original_labels[positions], ctx.target_class)
        grads = input_gradients(model, x, explained, args.batch_size)
        power = power_spectrum(grads)
        logmag = log_magnitude(power)
        profile = radial_profile(power)
        size = split.transform.size
        low = low_frequency_share(profile, size, args.low_cutoff)
        saliency = reduce_map(grads, size)
        masks = split_footprints(split, bd_pos, tolerance)
        mask_of = {int(p): masks[j] for j, p in enumerate(bd_pos)}
        poisoned = split.poison[positions]
        names = ctx.class_names

        for page_no, rows in enumerate(pages(len(positions))):
            fig, axes = table_figure(len(rows), 3, cell=1.9)
            for r, i in enumerate(rows):
                p = positions[i]
                image = ctx.denormalize(x[i])
                title, color = image_title(split, p, names)
                show_image(axes[r, 0], image, title, color=color)
                kind = "poisoned" if poisoned[i] else "clean"
                show_heatmap(axes[r, 1], image, saliency[i], f"{kind}: |gradient| of\n{short(names[explained[i]])} "
                             f"(pred {short(names[predicted[i]], 10)} {probs[i, predicted[i]]:.2f})", color=color)
                if int(p) in mask_of:
                    draw_footprint(axes[r, 1], mask_of[int(p)])
                shown = axes[r, 2].imshow(logmag[i], cmap="magma", interpolation="nearest")
                axes[r, 2].set_xticks([]); axes[r, 2].set_yticks([])
                axes[r, 2].set_title(f"{kind}: log10 |FFT|, centred\nlow-freq. share {low[i]:.2f}", fontsize=7,
                                     color=color)
                plt.colorbar(shown, ax=axes[r, 2], fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
            fig.suptitle(f"Frequency saliency, {ctx.model_label} model, {split.name} of {ctx.record.name}"
                         + (f" (page {page_no + 1})" if page_no else ""), fontsize=9)
            fig.tight_layout()
            ctx.out.save_figure(fig, "fre_maps" + (f"_p{page_no + 1}" if page_no else ""))

        draw_profiles(ctx, profile, logmag, poisoned, size, args.low_cutoff)
        long_rows, share_rows = [], []
        normalised = np.arange(profile.shape[1]) / (min(size) / 2)
        for i, p in enumerate(positions):
            base = [int(p), int(split.indices[p]), int(poisoned[i]), int(split.labels[p]),
                    int(split.original_labels[p]), int(predicted[i]), int(explained[i])]
            share_rows.append(base + [float(low[i]), float(1 - low[i]), float((grads[i] ** 2).sum())])
            long_rows += [base + [r, float(normalised[r]), float(profile[i, r])] for r in range(profile.shape[1])]
        head = ["position", "original_index", "poisoned", "label", "original_label", "predicted", "explained"]
        ctx.out.save_csv("fre_radial_profile", long_rows, header=head + ["radius", "normalised_radius", "energy_share"])
        ctx.out.save_csv("fre_energy_share", share_rows,
                         header=head + ["low_frequency_share", "high_frequency_share", "gradient_energy"])
        summary = {"split": split.name, "model": ctx.model_label, "target": args.target, "low_cutoff": args.low_cutoff,
                   "clean_images": int(len(clean_pos)), "poisoned_images": int(len(bd_pos)), "note": note}
        for kind, sel in (("clean", ~poisoned), ("poisoned", poisoned)):
            if sel.any():
                summary[f"low_frequency_share_{kind}"] = float(low[sel].mean())
                print(f"{kind} images ({int(sel.sum())}): mean low-frequency share of gradient energy "
                      f"{low[sel].mean():.3f}, high {1 - low[sel].mean():.3f}")
        if len(bd_pos):
            k = len(clean_pos)
            meta = [{"model": ctx.model_label, "position": int(p), "original_index": int(split.indices[p]),
                     "label": int(split.labels[p]), "original_label": int(split.original_labels[p]),
                     "predicted": int(predicted[k + j]), "explained": int(explained[k + j])}
                    for j, p in enumerate(bd_pos)]
            rows = score_maps(saliency[k:], masks, "input_gradient", meta, args.topk_percent, seed=args.seed)
            table = save_localisation(ctx.out, "fre", rows)
            summary["localisation"] = table
            print(describe(table, "input_gradient", f"{ctx.model_label} model, |gradient| map", model=ctx.model_label))
        ctx.out.save_json("summary", summary)
        return ctx.finish(summary)


def draw_profiles(ctx, profile, logmag, poisoned, size, cutoff):
    """Mean radial energy profile and mean log spectrum, clean against poisoned."""
    groups = [(kind, sel) for kind, sel in (("clean", ~poisoned), ("poisoned", poisoned)) if sel.any()]
    fig, axes = plt.subplots(1, 1 + len(groups), figsize=(4.6 + 3.2 * len(groups), 3.6), squeeze=False)
    axes = axes[0]
    radius = np.arange(profile.shape[1]) / (min(size) / 2)
    for kind, sel in groups:
        color = "#d62728" if kind == "poisoned" else "#1f77b4"
        mean = profile[sel].mean(axis=0)
        axes[0].plot(radius, mean, color=color, label=f"{kind} ({int(sel.sum())} images)")
        if sel.sum() > 1:
            axes[0].fill_between(radius, profile[sel].min(axis=0), profile[sel].max(axis=0), color=color, alpha=0.15)
    axes[0].axvline(cutoff, color="gray", linestyle="--", linewidth=1, label=f"low | high cut-off {cutoff}")
    axes[0].set_xlabel("normalised radius (1 = Nyquist of the shorter side)")
    axes[0].set_ylabel("share of gradient energy")
    axes[0].set_title("radial energy profile (mean, band: min-max)", fontsize=9)
    axes[0].legend(fontsize=7)
    for ax, (kind, sel) in zip(axes[1:], groups):
        shown = ax.imshow(logmag[sel].mean(axis=0), cmap="magma", interpolation="nearest")
        ax.set_xticks([]); ax.set_yticks([])
        ax.set_title(f"mean log10 |FFT| of the gradient,\n{kind} images", fontsize=9)
        plt.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
    fig.suptitle(f"Frequency saliency, {ctx.record.name}", fontsize=10)
    fig.tight_layout()
    ctx.out.save_figure(fig, "fre_radial_profile")


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__, default_split="mixed")
