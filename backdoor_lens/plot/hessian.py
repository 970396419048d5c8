"""The Hessian figure: the eigenvalue density (log scale) of each model, its top eigenvalues marked."""
import numpy as np

from backdoor_lens.plot.base import side_by_side


def draw_density(ax, spectrum, label: str):
    density = spectrum.density
    floor = max(density.density.max() * 1e-8, 1e-12)
    ax.semilogy(density.grid, np.maximum(density.density, floor), color="#1f77b4", lw=1.2, label="density (SLQ)")
    for rank, value in enumerate(spectrum.top.eigenvalues):
        ax.axvline(value, color="#d62728", ls="--", lw=0.9, label="top eigenvalues" if rank == 0 else None)
        ax.annotate(f"{value:.3g}", (value, 0.97), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                    ha="right", va="top", color="#d62728")
    ax.set_ylim(floor, density.density.max() * 3)
    ax.set_xlabel("eigenvalue"); ax.set_ylabel("density (log scale)")
    ax.set_title(f"{label} model: top {spectrum.top.eigenvalues[0]:.4g}, trace {spectrum.trace.trace:.4g} "
                 f"(+-{spectrum.trace.stderr:.2g})", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", frameon=False)


def hessian_figure(spectra: dict, record: str, split: str, samples: int):
    """spectra: {model label: HessianSpectrum}, one panel per model."""
    fig, axes = side_by_side(len(spectra), width=6, height=4.2)
    for ax, (label, spectrum) in zip(axes, spectra.items()):
        draw_density(ax, spectrum, label)
    fig.suptitle(f"Hessian eigenvalue density, {record}, {split} ({samples} samples)", fontsize=10)
    return fig
