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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from backdoor_lens.analysis import Analysis
from backdoor_lens.device import progress
from backdoor_lens.errors import UserError
from backdoor_lens.plot.quality import examples_figure
from backdoor_lens.report.numbers import listed_numbers

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_KERNEL = 11
PER_PAIR = ("psnr", "ssim", "ms_ssim", "lpips", "l2", "linf", "changed_fraction")  # the CSV's order


def add_arguments(parser):
    parser.add_argument("--n_examples", type=int, default=8, help="image pairs shown in the figure")


@dataclass(frozen=True)
class Settings:
    n_examples: int


def settings(args) -> Settings:
    if args.n_examples < 0:
        raise UserError("--n_examples must be 0 or more")
    return Settings(args.n_examples)


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
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        self.lpips = self._load("LPIPS", "lpips", "the lpips package is not installed", checkpoints / self.ALEXNET,
                                "AlexNet", self._build_lpips)
        self.fid = self._load("FID", "torch_fidelity", "torch-fidelity (torchmetrics' FID backend) is not installed",
                              checkpoints / self.INCEPTION, "Inception", self._build_fid)
        self.fid_count = 0

    def _load(self, metric: str, package: str, missing: str, weights: Path, network: str, build):
        """The metric's network, or None with a note saying why it is skipped (nothing is downloaded)."""
        if importlib.util.find_spec(package) is None:
            self.notes.append(f"{metric} skipped: {missing}")
        elif not weights.is_file():
            self.notes.append(f"{metric} skipped: its {network} weights are not in {weights.parent} "
                              f"(never downloaded here)")
        else:
            try:
                return build()
            except Exception as error:  # a broken optional package must not stop the analysis
                self.notes.append(f"{metric} skipped: {type(error).__name__}: {error}")
        return None

    def _build_lpips(self):
        import lpips

        return lpips.LPIPS(net="alex", verbose=False).to(self.device).eval()

    def _build_fid(self):
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=2048, normalize=True).to(self.device)

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


@dataclass
class TriggerVisibility:
    record: str
    split: str
    indices: np.ndarray  # original index of each pair
    original_labels: np.ndarray
    poison_labels: np.ndarray
    quality: QualityResult
    examples: list  # [(original index, original label, clean image, poisoned image, PSNR)] for the figure


def example_pairs(poisoned, clean, psnr: np.ndarray, count: int) -> list:
    """`count` pairs spread evenly over the split, in pixel space."""
    positions = np.unique(np.linspace(0, len(poisoned) - 1, min(count, len(poisoned))).round().astype(int))
    examples = []
    for position in positions:
        xp, _, y0p, _, idx = poisoned[position]
        examples.append((idx, y0p, clean[position][0], xp, psnr[position]))
    return examples


def compute(ctx, settings: Settings) -> TriggerVisibility:
    split = ctx.use_split(needs_poison=True)
    poisoned = split.only_poisoned().pixels()
    clean = poisoned.clean_twin()
    quality = compute_quality(ctx.loader(poisoned), ctx.loader(clean), tuple(ctx.record.img_size[:2]),
                              WeightedMetrics(ctx.device))
    return TriggerVisibility(ctx.record.name, split.name, poisoned.indices, poisoned.original_labels, poisoned.labels,
                             quality, example_pairs(poisoned, clean, quality.metrics["psnr"], settings.n_examples))


def summarise(values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    return {"mean": float(finite.mean()) if len(finite) else None,
            "std": float(finite.std(ddof=1)) if len(finite) > 1 else None,
            "min": float(finite.min()) if len(finite) else None, "max": float(finite.max()) if len(finite) else None,
            "count": int(len(finite)), "infinite": int(len(values) - len(finite))}


def write(result: TriggerVisibility, ctx) -> dict:
    quality = result.quality
    per_pair = [k for k in PER_PAIR if k in quality.metrics]
    rows = [[int(result.indices[i]), int(result.original_labels[i]), int(result.poison_labels[i])] +
            [float(quality.metrics[k][i]) for k in per_pair] for i in range(len(result.indices))]
    ctx.out.save_csv("quality_per_image", rows, header=["original_index", "original_label", "poison_label"] + per_pair)
    stats = {k: summarise(quality.metrics[k]) for k in per_pair}
    summary = {"split": result.split, "pairs": len(result.indices), "ms_ssim_scales": quality.ms_ssim_scales,
               "notes": quality.notes, "metrics": stats}
    if "fid" in quality.metrics:
        summary["fid"] = float(quality.metrics["fid"][0])
    ctx.out.save_csv("quality_summary", [[k, s["mean"], s["std"], s["min"], s["max"], s["count"], s["infinite"]]
                                         for k, s in stats.items()],
                     header=["metric", "mean", "std", "min", "max", "count", "infinite"])
    for k, s in stats.items():
        summary[f"{k}_mean"] = s["mean"]
    if result.examples:
        ctx.out.save_figure(examples_figure(
            result.examples, list(ctx.class_names),
            f"Trigger visibility, {result.record}, {result.split}: mean PSNR "
            f"{stats['psnr']['mean'] or float('inf'):.1f} dB, SSIM {stats['ssim']['mean']:.3f}"), "quality_examples")
    print(f"{len(result.indices)} poisoned/clean pairs from {result.split}: " + "; ".join(
        f"{k} {s['mean']:.4g} +- {s['std'] if s['std'] is not None else float('nan'):.3g}"
        for k, s in stats.items() if s["mean"] is not None)
          + (f"; FID {summary['fid']:.4g}" if "fid" in summary else ""))
    for note in quality.notes:
        print(note)
    return summary


def key_numbers(folder) -> list:
    return listed_numbers(folder, "trigger visibility", ("psnr_mean", "ssim_mean", "ms_ssim_mean", "l2_mean",
                                                         "linf_mean"))


ANALYSIS = Analysis(
    name="quality", title="Trigger visibility", order=18,
    guide="PSNR/SSIM and norms between each poisoned image and its clean twin; high PSNR/SSIM means an invisible "
          "trigger.",
    shows="how visible the trigger is: PSNR, SSIM and norms between poisoned and clean images",
    compute=compute, write=write, settings=settings, add_arguments=add_arguments, key_numbers=key_numbers,
    splits=("bd_test", "bd_train", "mixed", "subset"), default_split="bd_test", needs_poison=True,
    on_blended_demo=True, demo_args=("--visual_dataset", "bd_test"), quick_args=("--n_sub", "8", "--n_examples", "2"))
