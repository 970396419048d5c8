"""How visible the trigger is: each poisoned image against its clean twin, in pixel space [0, 1].

Pairs are made by original index (the poisoned sample and the same sample served clean), never by
position in two separately ordered lists. Per pair: PSNR = 10 log10(1 / MSE), SSIM, MS-SSIM
(torchmetrics; with fewer scales than the standard five when the image is too small for them:
the scales used are reported, and values with fewer scales are not comparable to 5-scale ones),
the L2 and L-infinity norms of the perturbation, and the fraction of pixels changed. LPIPS and FID
need network weights that are downloaded at first use; they are computed only when the weights
are already on disk, and otherwise reported as skipped (nothing is downloaded).
"""
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils.cli import main
from utils.context import load_context
from utils.device import progress
from utils.errors import UserError
from utils.plotting import plt, show_image

DEMO_ARGS = ["--visual_dataset", "bd_test"]

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_KERNEL = 11


def add_arguments(parser):
    parser.add_argument("--n_examples", type=int, default=8, help="image pairs shown in the figure")


def ms_ssim_scales(height: int, width: int, kernel: int = MS_SSIM_KERNEL) -> int:
    """Most scales (at most 5) for which torchmetrics' MS-SSIM accepts the size:
    min(H, W) > (kernel - 1) * 2^(scales - 1). 0 when not even two fit."""
    side = min(height, width)
    for scales in range(5, 1, -1):
        if side > (kernel - 1) * 2 ** (scales - 1):
            return scales
    return 0


@dataclass
class QualityResult:
    indices: np.ndarray
    metrics: dict  # name -> per-pair values
    ms_ssim_scales: int
    notes: list = field(default_factory=list)


def pair_metrics(poisoned: torch.Tensor, clean: torch.Tensor, ms_scales: int) -> dict:
    """Per-pair metrics for two N x C x H x W batches in [0, 1]."""
    from torchmetrics.functional.image import (multiscale_structural_similarity_index_measure,
                                               peak_signal_noise_ratio, structural_similarity_index_measure)

    delta = (poisoned - clean).flatten(1)
    changed = ((poisoned - clean).abs() > 0.5 / 255).any(dim=1).flatten(1).float().mean(1)
    out = {
        "psnr": peak_signal_noise_ratio(poisoned, clean, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "ssim": structural_similarity_index_measure(poisoned, clean, data_range=1.0, reduction="none"),
        "l2": delta.norm(dim=1),
        "linf": delta.abs().max(dim=1).values,
        "changed_fraction": changed,
    }
    if ms_scales:
        betas = MS_SSIM_BETAS[:ms_scales]
        betas = tuple(b / sum(betas) for b in betas)
        out["ms_ssim"] = multiscale_structural_similarity_index_measure(
            poisoned, clean, data_range=1.0, reduction="none", betas=betas, kernel_size=MS_SSIM_KERNEL,
            normalize="relu")
    return {k: v.detach().double().cpu().reshape(-1).numpy() for k, v in out.items()}


def compute_quality(poisoned_loader, clean_loader, image_size: tuple, extra=None) -> QualityResult:
    """Walk two loaders that serve the same samples (poisoned, clean twin) in the same order."""
    scales = ms_ssim_scales(*image_size)
    notes = []
    if scales == 0:
        notes.append(f"MS-SSIM skipped: {image_size[0]}x{image_size[1]} is too small for two scales "
                     f"with an {MS_SSIM_KERNEL}-pixel window")
    elif scales < 5:
        notes.append(f"MS-SSIM over {scales} scales (image too small for 5; weights renormalised)")
    parts, indices = [], []
    for (xp, _, _, _, ip), (xc, _, _, _, ic) in progress(zip(poisoned_loader, clean_loader), "quality",
                                                         total=len(poisoned_loader)):
        if not torch.equal(ip, ic):
            raise RuntimeError("poisoned and clean loaders are out of step")
        metrics = pair_metrics(xp.float(), xc.float(), scales)
        if extra is not None:
            metrics.update(extra.batch(xp.float(), xc.float()))
        parts.append(metrics)
        indices.append(ip.numpy())
    if extra is not None:
        notes += extra.notes
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if extra is not None:
        merged.update(extra.dataset_level())
    return QualityResult(np.concatenate(indices), merged, scales, notes)


class WeightedMetrics:
    """LPIPS (per pair) and FID (poisoned set vs clean set), only when their weights are on disk."""

    ALEXNET = "alexnet-owt-7be5be79.pth"
    INCEPTION = "weights-inception-2015-12-05-6726825d.pth"

    def __init__(self, device):
        self.device = device
        self.notes = []
        self.lpips = self.fid = None
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        if importlib.util.find_spec("lpips") is None:
            self.notes.append("LPIPS skipped: the lpips package is not installed")
        elif not (checkpoints / self.ALEXNET).is_file():
            self.notes.append(f"LPIPS skipped: its AlexNet weights are not in {checkpoints} (never downloaded here)")
        else:
            try:
                import lpips

                self.lpips = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
            except Exception as error:  # a broken optional package must not stop the analysis
                self.notes.append(f"LPIPS skipped: {type(error).__name__}: {error}")
        if importlib.util.find_spec("torch_fidelity") is None:
            self.notes.append("FID skipped: torch-fidelity (torchmetrics' FID backend) is not installed")
        elif not (checkpoints / self.INCEPTION).is_file():
            self.notes.append(f"FID skipped: its Inception weights are not in {checkpoints} (never downloaded here)")
        else:
            try:
                from torchmetrics.image.fid import FrechetInceptionDistance

                self.fid = FrechetInceptionDistance(feature=2048, normalize=True).to(device)
            except Exception as error:
                self.notes.append(f"FID skipped: {type(error).__name__}: {error}")
        self.fid_count = 0

    @staticmethod
    def _rgb(x):
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    @torch.no_grad()
    def batch(self, poisoned, clean) -> dict:
        out = {}
        if self.lpips is not None:
            p, c = self._rgb(poisoned).to(self.device), self._rgb(clean).to(self.device)
            out["lpips"] = self.lpips(p * 2 - 1, c * 2 - 1).flatten().double().cpu().numpy()
        if self.fid is not None:
            self.fid.update(self._rgb(clean).to(self.device), real=True)
            self.fid.update(self._rgb(poisoned).to(self.device), real=False)
            self.fid_count += len(poisoned)
        return out

    def dataset_level(self) -> dict:
        if self.fid is None:
            return {}
        if self.fid_count < 2:
            self.notes.append("FID skipped: needs at least 2 pairs")
            return {}
        return {"fid": np.array([float(self.fid.compute())])}


def draw_examples(split_poisoned, split_clean, positions, result: QualityResult, names):
    n = len(positions)
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(3 * rows, cols, figsize=(max(3.0, 1.8 * cols), 5.6 * rows + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, position in enumerate(positions):
        r, c = 3 * (k // cols), k % cols
        xp, _, y0p, _, idx = split_poisoned[position]
        xc = split_clean[position][0]
        psnr = result.metrics["psnr"][position]
        show_image(axes[r, c], xc, f"#{idx} ({names[y0p]})\nclean", fontsize=7)
        show_image(axes[r + 1, c], xp, f"poisoned\nPSNR {psnr:.1f} dB", color="#d62728", fontsize=7)
        diff = (xp - xc).abs().amax(dim=0).numpy()
        top = diff.max()
        ax = axes[r + 2, c]
        ax.imshow(diff / top if top > 0 else diff, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([]); ax.set_yticks([]); ax.axis("on")
        ax.set_title(f"|difference| x{1 / top:.1f}" if top > 0 else "no difference", fontsize=7)
    return fig


def summarise(values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    return {"mean": float(finite.mean()) if len(finite) else None,
            "std": float(finite.std(ddof=1)) if len(finite) > 1 else None,
            "min": float(finite.min()) if len(finite) else None, "max": float(finite.max()) if len(finite) else None,
            "count": int(len(finite)), "infinite": int(len(values) - len(finite))}


def run(args) -> dict:
    if args.n_examples < 0:
        raise UserError("--n_examples must be 0 or more")
    with load_context(args, "quality", needs_poison=True) as ctx:
        poisoned = ctx.split.only_poisoned().pixels()
        clean = poisoned.clean_twin()
        extra = WeightedMetrics(ctx.device)
        result = compute_quality(ctx.loader(poisoned), ctx.loader(clean), tuple(ctx.record.img_size[:2]), extra)
        per_pair = [k for k in ("psnr", "ssim", "ms_ssim", "lpips", "l2", "linf", "changed_fraction")
                    if k in result.metrics]
        rows = [[int(poisoned.indices[i]), int(poisoned.original_labels[i]), int(poisoned.labels[i])] +
                [float(result.metrics[k][i]) for k in per_pair] for i in range(len(poisoned))]
        ctx.out.save_csv("quality_per_image", rows, header=["original_index", "original_label", "poison_label"] + per_pair)
        stats = {k: summarise(result.metrics[k]) for k in per_pair}
        summary = {"split": ctx.split.name, "pairs": len(poisoned), "ms_ssim_scales": result.ms_ssim_scales,
                   "notes": result.notes, "metrics": stats}
        if "fid" in result.metrics:
            summary["fid"] = float(result.metrics["fid"][0])
        ctx.out.save_csv("quality_summary", [[k, s["mean"], s["std"], s["min"], s["max"], s["count"], s["infinite"]]
                                             for k, s in stats.items()],
                         header=["metric", "mean", "std", "min", "max", "count", "infinite"])
        for k, s in stats.items():
            summary[f"{k}_mean"] = s["mean"]
        positions = np.unique(np.linspace(0, len(poisoned) - 1, min(args.n_examples, len(poisoned))).round().astype(int))
        if len(positions):
            fig = draw_examples(poisoned, clean, positions, result, list(ctx.class_names))
            fig.suptitle(f"Trigger visibility, {ctx.record.name}, {ctx.split.name}: mean PSNR "
                         f"{stats['psnr']['mean'] or float('inf'):.1f} dB, SSIM {stats['ssim']['mean']:.3f}", fontsize=10)
            ctx.out.save_figure(fig, "quality_examples")
        print(f"{len(poisoned)} poisoned/clean pairs from {ctx.split.name}: " + "; ".join(
            f"{k} {s['mean']:.4g} +- {s['std'] if s['std'] is not None else float('nan'):.3g}"
            for k, s in stats.items() if s["mean"] is not None)
              + (f"; FID {summary['fid']:.4g}" if "fid" in summary else ""))
        for note in result.notes:
            print(note)
        ctx.out.save_json("summary", summary)
        return ctx.finish(summary)


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__, default_split="bd_test")
