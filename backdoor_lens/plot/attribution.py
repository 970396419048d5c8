"""The attribution analyses' figures: heat maps over images, trigger footprints, paged image tables,
localisation bars against the baselines, the method ranking, and the frequency-saliency panels.

Every function takes computed data (backdoor_lens.attribution.pipeline's `Images`, maps, scores)
and returns figures; nothing here computes a result.
"""
import numpy as np

from backdoor_lens.attribution.footprint import BASELINES
from backdoor_lens.plot.base import plt, show_image, to_display

ROWS_PER_PAGE = 12  # a figure of 64 images stays readable as pages of 12 rows
BASELINE_STYLES = (("blank", "--", "black"), ("random", ":", "#d62728"), ("edge", "-.", "#2ca02c"))
RANKING_LABELS = {"correlation": "correlation of map with footprint (higher is better)",
                  "l1": "L1 distance of [0,1]-scaled map to footprint, per pixel (lower is better)"}
FOOTPRINT_NOTE = "cyan outline: trigger footprint"


# --- panels ------------------------------------------------------------------------------------
def short(name, n: int = 14) -> str:
    name = str(name)
    return name if len(name) <= n else name[: n - 1] + "…"


def show_heatmap(ax, image, heat: np.ndarray, title: str = "", alpha: float = 0.5, cmap: str = "jet",
                 color: str = "black", fontsize: int = 7):
    """The image (gray for one channel) with a heat map over it, no ticks."""
    show_image(ax, image, title, color=color, fontsize=fontsize)
    heat = np.asarray(heat, dtype=float)
    span = heat.max() - heat.min()
    ax.imshow((heat - heat.min()) / span if span > 0 else np.zeros_like(heat), cmap=cmap, alpha=alpha, vmin=0,
              vmax=1, interpolation="bilinear")


def _red_transparent_blue():
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("red_transparent_blue", [(0.0, 0.45, 1.0, 1.0), (1.0, 1.0, 1.0, 0.0),
                                                                      (1.0, 0.0, 0.3, 1.0)])


def show_signed(ax, heat: np.ndarray, title: str = "", fontsize: int = 7, image=None, limit: float | None = None):
    """A signed map, red positive and blue negative, symmetric around zero (transparent at zero) over a
    faint gray copy of the image, as shap's image plot draws it."""
    if image is not None:
        gray = to_display(image)
        gray = gray.mean(axis=2) if gray.ndim == 3 else gray
        ax.imshow(gray, cmap="gray", alpha=0.45, vmin=0, vmax=1, interpolation="nearest")
    limit = limit or float(np.abs(heat).max()) or 1.0
    shown = ax.imshow(heat, cmap=_red_transparent_blue(), vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_xticks([]); ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)
    return shown


def draw_footprint(ax, mask: np.ndarray, color: str = "cyan", linewidth: float = 1.0):
    """Outline a footprint on pixel borders (imshow coordinates)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return
    h, w = mask.shape
    s = 4  # upsample so that the contour follows pixel edges instead of pixel centres
    fine = np.kron(mask.astype(float), np.ones((s, s)))
    fine = np.pad(fine, 1)
    ys = np.linspace(-0.5 - 1 / s, h - 0.5 + 1 / s, fine.shape[0])
    xs = np.linspace(-0.5 - 1 / s, w - 0.5 + 1 / s, fine.shape[1])
    ax.contour(xs, ys, fine, levels=[0.5], colors=[color], linewidths=linewidth)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


def sample_title(images, i: int, names) -> tuple[str, str]:
    """(title, colour) of row i, from its poison flag: which it is, is read from the data."""
    label, original = int(images.labels[i]), int(images.original_labels[i])
    if images.poison[i]:
        was = f" (was {short(names[original])})" if original != label else ""
        return f"POISONED\nlabel {short(names[label])}{was}", "#d62728"
    return f"clean\nlabel {short(names[label])}", "black"


# --- paged image tables ------------------------------------------------------------------------
def pages(n: int, per_page: int = ROWS_PER_PAGE) -> list[range]:
    """Row ranges of at most per_page rows."""
    return [range(s, min(n, s + per_page)) for s in range(0, max(n, 1), per_page)] if n else []


def table_figure(rows: int, cols: int, cell: float = 1.75, title_space: float = 0.55):
    fig, axes = plt.subplots(rows, cols, figsize=(max(3.0, cols * cell), rows * (cell + title_space) + 0.6),
                             squeeze=False)
    return fig, axes


def image_pages(images, rows, n_cols: int, names, draw_row, suptitle, cell: float = 1.75, caption=None,
                fontsize: int = 8):
    """One figure per page of `rows` (row indices of `images`): column 0 the image, titled clean or
    POISONED (plus `caption(i)`), columns 1.. drawn by draw_row(axes_of_the_row, i, r, image) for page
    row r; suptitle(page_no) gives each page's title."""
    rows = list(rows)
    for page_no, page in enumerate(pages(len(rows))):
        fig, axes = table_figure(len(page), n_cols, cell)
        for r, i in enumerate(rows[j] for j in page):
            image = images.display[i]
            title, color = sample_title(images, i, names)
            show_image(axes[r, 0], image, title + (caption(i) if caption else ""), color=color, fontsize=fontsize)
            draw_row(axes[r], i, r, image)
        fig.suptitle(suptitle(page_no), fontsize=9)
        fig.tight_layout()
        yield fig


def page_suffix(page_no: int) -> str:
    return f" (page {page_no + 1})" if page_no else ""


def gradcam_pages(images, rows, classes: dict, maps: dict, layers, names, method: str, record: str):
    """Rows (images) x columns (image, then each model's map at each layer); classes: {model: Classes},
    maps: {model: {layer: N x H x W}}."""
    rows = list(rows)
    columns = [(label, layer) for label in maps for layer in layers]

    def draw_row(axes, i, r, image):
        for c, (label, layer) in enumerate(columns, start=1):
            pred, expl = classes[label].predicted[i], classes[label].explained[i]
            show_heatmap(axes[c], image, maps[label][layer][i],
                         f"{label} · {short(layer, 16)}\npred {short(names[pred], 10)} "
                         f"{classes[label].probs[i, pred]:.2f}\nexplains {short(names[expl], 10)}")
            if images.footprint(i) is not None:
                draw_footprint(axes[c], images.footprint(i))

    n_clean = sum(1 for i in rows if i < images.n_clean)
    what = "clean and poisoned" if n_clean and len(rows) > n_clean else ("clean" if n_clean else "poisoned")
    return image_pages(images, rows, 1 + len(columns), names, draw_row, lambda page_no: (
        f"{method} on {what} images of {images.split.name}, {record}{page_suffix(page_no)}\n"
        f"{FOOTPRINT_NOTE} (pixels differing from the clean twin)"))


def saliency_pages(images, rows, classes, maps: dict, names, model: str, record: str):
    """Rows (images) x columns (image, then each method's map); maps: {method: N x H x W}."""
    methods = list(maps)

    def draw_row(axes, i, r, image):
        for c, method in enumerate(methods, start=1):
            show_heatmap(axes[c], image, maps[method][i], method.replace("_", " ") if r == 0 else "")
            if images.footprint(i) is not None:
                draw_footprint(axes[c], images.footprint(i))
        axes[1].set_ylabel(f"explains {short(names[classes.explained[i]], 10)}", fontsize=7)

    def caption(i):
        pred = classes.predicted[i]
        return f"\npred {short(names[pred], 10)} {classes.probs[i, pred]:.2f}"

    return image_pages(images, rows, 1 + len(methods), names, draw_row, lambda page_no: (
        f"Attributions (|.| summed over channels), {model} model, {images.split.name} of {record}"
        f"{page_suffix(page_no)}\n{FOOTPRINT_NOTE}"), cell=1.55, caption=caption, fontsize=7)


def shap_pages(images, maps: np.ndarray, classes, probs, totals, names, where: str, model: str, record: str):
    """Rows (images) x columns (image, then the SHAP map of each ranked class); maps: N x R x H x W."""
    ranked = maps.shape[1]

    def draw_row(axes, i, r, image):
        for c in range(ranked):
            k = int(classes[i, c])
            show_signed(axes[c + 1], maps[i, c], image=image, limit=float(np.abs(maps[i]).max()),
                        title=f"#{c + 1} {short(names[k], 12)}\np={probs[i, k]:.2f} sum={totals[i, c]:.2f}")
            if images.footprint(i) is not None:
                draw_footprint(axes[c + 1], images.footprint(i), color="lime")

    return image_pages(images, range(len(images)), 1 + ranked, names, draw_row, lambda page_no: (
        f"SHAP (expected gradients) on the {where}, {model} model, {record}\n"
        f"red: for the class, blue: against (one scale per row); green outline: trigger footprint"))


def fre_pages(images, classes, saliency: np.ndarray, logmag: np.ndarray, low: np.ndarray, names, model: str,
              record: str):
    """Rows (images) x (image, |gradient| map with the footprint, centred log spectrum of the gradient)."""

    def draw_row(axes, i, r, image):
        kind = "poisoned" if images.poison[i] else "clean"
        color = sample_title(images, i, names)[1]
        pred, expl = classes.predicted[i], classes.explained[i]
        show_heatmap(axes[1], image, saliency[i], f"{kind}: |gradient| of\n{short(names[expl])} "
                     f"(pred {short(names[pred], 10)} {classes.probs[i, pred]:.2f})", color=color)
        if images.footprint(i) is not None:
            draw_footprint(axes[1], images.footprint(i))
        shown = axes[2].imshow(logmag[i], cmap="magma", interpolation="nearest")
        axes[2].set_xticks([]); axes[2].set_yticks([])
        axes[2].set_title(f"{kind}: log10 |FFT|, centred\nlow-freq. share {low[i]:.2f}", fontsize=7, color=color)
        plt.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)

    return image_pages(images, range(len(images)), 3, names, draw_row, lambda page_no: (
        f"Frequency saliency, {model} model, {images.split.name} of {record}{page_suffix(page_no)}"), cell=1.9)


def fre_profiles_figure(groups: dict, radius: np.ndarray, cutoff: float, record: str):
    """Mean radial energy profile (band: min-max) and mean log spectrum of each group (clean, poisoned);
    groups: {kind: fre's Spectra}."""
    fig, axes = plt.subplots(1, 1 + len(groups), figsize=(4.6 + 3.2 * len(groups), 3.6), squeeze=False)
    axes = axes[0]
    for kind, group in groups.items():
        color = "#d62728" if kind == "poisoned" else "#1f77b4"
        axes[0].plot(radius, group.profile_mean, color=color, label=f"{kind} ({group.images} images)")
        if group.images > 1:
            axes[0].fill_between(radius, group.profile_min, group.profile_max, color=color, alpha=0.15)
    axes[0].axvline(cutoff, color="gray", linestyle="--", linewidth=1, label=f"low | high cut-off {cutoff}")
    axes[0].set_xlabel("normalised radius (1 = Nyquist of the shorter side)")
    axes[0].set_ylabel("share of gradient energy")
    axes[0].set_title("radial energy profile (mean, band: min-max)", fontsize=9)
    axes[0].legend(fontsize=7)
    for ax, (kind, group) in zip(axes[1:], groups.items()):
        shown = ax.imshow(group.logmag_mean, cmap="magma", interpolation="nearest")
        ax.set_xticks([]); ax.set_yticks([])
        ax.set_title(f"mean log10 |FFT| of the gradient,\n{kind} images", fontsize=9)
        plt.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
    fig.suptitle(f"Frequency saliency, {record}", fontsize=10)
    fig.tight_layout()
    return fig


# --- localisation scores -----------------------------------------------------------------------
def draw_score_bars(axes, summary: list[dict], methods: list[str], title_suffix: str = ""):
    """One panel per score: a bar per method (mean +- SEM), the baselines as lines."""
    rows = {r["method"]: r for r in summary}
    shown = [m for m in methods if m in rows]
    for ax, (score, label) in zip(axes, (("share", "in-footprint share of |attribution|"),
                                         ("pointing", "pointing game (peak in footprint)"),
                                         ("iou", "IoU of top-k pixels with footprint"))):
        x = np.arange(len(shown))
        means = [rows[m][score] for m in shown]
        errors = [rows[m][f"{score}_sem"] for m in shown]
        ax.bar(x, means, yerr=errors, color="#4c72b0", capsize=3)
        for xi, value, error in zip(x, means, errors):
            ax.text(xi, value + error + 0.02, f"{value:.2f}", ha="center", va="bottom", fontsize=7)
        for base, style, color in BASELINE_STYLES:
            if base in rows:
                ax.axhline(rows[base][score], color=color, linestyle=style, linewidth=1.2,
                           label=f"{base} map {rows[base][score]:.3f}")
        ax.set_xticks(x)
        ax.set_xticklabels(shown, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1.3)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_title(label + title_suffix, fontsize=9)
        ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)


def score_bars_figure(summary: list[dict], methods: list[str], title: str):
    """A row of three panels (share, pointing, IoU), about half an inch per bar."""
    fig, axes = plt.subplots(1, 3, figsize=(3 * max(3.2, 0.45 * len(methods) + 1.2), 3.8))
    draw_score_bars(axes, summary, methods)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def layer_bars_figure(table: list[dict], method: str, models: list[str], layers: list[str], record: str):
    """Mean scores of each (model, layer) map, with the blank and random baselines of the first."""
    bars = []
    for label in models:
        for layer in layers:
            for row in table:
                if row["model"] == label and row["layer"] == layer and row["method"] == method:
                    bars.append(dict(row, method=f"{label}: {layer}" if len(models) > 1 else layer))
    bases = [dict(r) for r in table if r["method"] in ("blank", "random") and r["model"] == models[0]
             and r["layer"] == layers[0]]
    return score_bars_figure(bars + bases, [b["method"] for b in bars],
                             f"{method}: trigger localisation on {bars[0]['images'] if bars else 0} poisoned images, "
                             f"{record}")


def draw_ranking(axes, rows_by_score: dict, order: list[str]):
    """One panel per score: a horizontal bar per method in `order` (best first, top), its mean with
    the 95% bootstrap interval; dark bars beat every baseline (attribution/ranking.py), light ones
    do not; the baselines are vertical lines. `rows_by_score` maps a score to its rank_methods rows."""
    for ax, (score, rows) in zip(axes, rows_by_score.items()):
        rows = {r["method"]: r for r in rows}
        shown = [m for m in order if m in rows and m not in BASELINES]
        y = np.arange(len(shown))[::-1]
        means = np.array([rows[m]["mean"] for m in shown], dtype=float)
        low = np.array([rows[m]["low"] for m in shown], dtype=float)
        high = np.array([rows[m]["high"] for m in shown], dtype=float)
        errors = np.nan_to_num(np.vstack([means - low, high - means]), nan=0.0).clip(min=0)
        beats_all = [all(rows[m].get(f"beats_{b}") is True for b in BASELINES if b in rows) for m in shown]
        colors = ["#1f4e8c" if b else "#a7b9d1" for b in beats_all]
        ax.barh(y, means, xerr=errors, color=colors, capsize=2, height=0.7)
        for base, style, color in BASELINE_STYLES:
            if base in rows:
                ax.axvline(rows[base]["mean"], color=color, linestyle=style, linewidth=1.3,
                           label=f"{base} {rows[base]['mean']:.3f}")
        ax.set_yticks(y)
        ax.set_yticklabels([m.replace("_", " ") for m in shown], fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(RANKING_LABELS.get(score, score), fontsize=9)
        ax.legend(fontsize=7, loc="lower right", frameon=False, title="baselines", title_fontsize=7)
    axes[0].set_xlabel("dark: beats every baseline (95% bootstrap interval of the paired difference above 0)",
                       fontsize=7)


def ranking_figure(ranking: list[dict], order: list[str], n_methods: int, title: str):
    """Casper et al.'s ranking: correlation and L1 panels, methods in `order`."""
    fig, axes = plt.subplots(1, 2, figsize=(5.2 * 2, 0.32 * n_methods + 1.9), squeeze=False)
    draw_ranking(axes[0], {score: [r for r in ranking if r["score"] == score] for score in ("correlation", "l1")},
                 order)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
