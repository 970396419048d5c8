"""Figures of the activation analyses: TAC heat grids (tac), poisoned and clean activation
profiles (na), pages of top-activating images (act), class make-up of each channel's top-k
(actdist), and feature maps of one image and of a poisoned image beside its clean twin (fm).

Each builder takes the numbers an analysis computed and returns figures; nothing here computes
a result (only what to show: colour scales, sort orders for display, which channels fit).
"""
import math

import numpy as np
from matplotlib.transforms import offset_copy

from backdoor_lens.plot.base import POISON_COLOR, legend_outside, plt, show_image

CLEAN_COLOR = "#1f77b4"


# --- tac -------------------------------------------------------------------------------------------

def heat_matrix(layers, values: dict) -> np.ndarray:
    """Layers x channels (padded with NaN to the widest layer)."""
    width = max(len(values[name]) for name in layers)
    matrix = np.full((len(layers), width), np.nan)
    for row, name in enumerate(layers):
        matrix[row, :len(values[name])] = values[name]
    return matrix


def text_width_inches(fig, texts, fontsize: float) -> float:
    """Width of the widest one-line text, in inches, measured by the figure's renderer one text at a
    time (no layout pass over the whole figure)."""
    from matplotlib.font_manager import FontProperties

    renderer = fig.canvas.get_renderer()
    font = FontProperties(size=fontsize)
    return max((renderer.get_text_width_height_descent(text, font, ismath=False)[0] for text in texts),
               default=0.0) / fig.dpi


def draw_heat_grid(ax, cax, layers, shown: dict, marked: list, vmax: float, title: str, label: str, clipped: bool,
                   label_size: float):
    matrix = heat_matrix(layers, shown)
    cmap = plt.get_cmap("magma_r").with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap=cmap, vmin=0, vmax=vmax,
                      interpolation="nearest")
    rows = {name: i for i, name in enumerate(layers)}
    for rank, (layer, channel, _) in enumerate(marked, start=1):
        ax.plot(channel, rows[layer], "o", ms=7, mfc="none", mec="#00c8ff", mew=1.4)
        ax.annotate(str(rank), (channel, rows[layer]), xytext=(4, 2), textcoords="offset points", fontsize=6,
                    color="#0090c0")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=label_size)
    ax.set_xlabel("channel")
    ax.set_title(title, fontsize=10)
    plt.colorbar(image, cax=cax, extend="max" if clipped else "neither").set_label(label, fontsize=8)


def bar_names(top: list) -> list:
    """The bar labels, top bar first: '1. layer #channel'."""
    return [f"{rank}. {layer} #{channel}" for rank, (layer, channel, _) in enumerate(top, start=1)]


def draw_top_bars(ax, top: list, title: str):
    values = [value for _, _, value in top][::-1]
    ax.barh(range(len(values)), values, color="#b5367a")
    ax.set_yticks(range(len(values)))
    ax.set_yticklabels(bar_names(top)[::-1], fontsize=7)
    ax.set_xlabel("TAC")
    ax.set_title(title, fontsize=10)


def tac_figure(layers, shown: dict, top: dict, normalized: bool, pairs: int, split: str, record: str):
    """shown: {model label: {layer: TAC per channel}} (or each divided by its layer's maximum);
    top: {model label: [(layer, channel, TAC)]}, circled and named. One row of panels per model.

    Laid out in inches from the widest labels (measured one at a time), not by tight_layout, which
    measures every text of the figure in an extra pass: save it uncropped (crop=False)."""
    row_height = max(4.0, 0.16 * len(layers) + 1.8)
    width, height = 16.0, row_height * len(shown) + 0.5
    fig = plt.figure(figsize=(width, height))
    label = "TAC / layer maximum" if normalized else "TAC"
    clipped = False
    if normalized:
        vmax = 1.0
    else:
        # A few channels (often the logits) change far more than the rest; the colour scale ends
        # at the 99.5th percentile so that the other layers do not all look alike.
        values = np.concatenate([np.concatenate(list(s.values())) for s in shown.values()])
        vmax, largest = float(np.percentile(values, 99.5)), float(values.max())
        clipped = largest > vmax * 1.05
        vmax = vmax if clipped and vmax > 0 else largest
        if clipped:
            label += f" (scale ends at the 99.5th percentile, {vmax:.3g}; largest {largest:.3g})"
    label_size = 6 if len(layers) > 25 else 7
    layer_labels = text_width_inches(fig, layers, label_size)
    bar_labels = text_width_inches(fig, [name for marked in top.values() for name in bar_names(marked)], 7)
    # Inches, left to right: layer names, heat grid, colour bar (its ticks and its label), bar
    # names, bars. Top to bottom within a row: panel title, panel, tick labels and axis label.
    heat_left = 0.15 + layer_labels + 0.1
    bars_width = 3.0
    cbar_width, cbar_room = 0.2, 0.95
    # Wider than 16 inches only when long names would leave the heat grid under 6 inches.
    width = max(width, heat_left + 6.0 + 0.1 + cbar_width + cbar_room + bar_labels + 0.25 + bars_width + 0.3)
    fig.set_size_inches(width, height)
    bars_left = width - 0.3 - bars_width
    heat_right = bars_left - bar_labels - 0.25 - cbar_room - cbar_width - 0.1
    for row, model_label in enumerate(shown):
        top_edge = height - 0.5 - row * row_height - 0.35
        bottom_edge = height - 0.5 - (row + 1) * row_height + 0.6
        box = lambda left, right: [left / width, bottom_edge / height, (right - left) / width,  # noqa: E731
                                   (top_edge - bottom_edge) / height]
        ax_heat = fig.add_axes(box(heat_left, heat_right))
        cax = fig.add_axes(box(heat_right + 0.1, heat_right + 0.1 + cbar_width))
        ax_bars = fig.add_axes(box(bars_left, bars_left + bars_width))
        marked = top[model_label]
        draw_heat_grid(ax_heat, cax, layers, shown[model_label], marked, vmax,
                       f"{model_label} model: TAC per channel ({pairs} poisoned/clean pairs, "
                       f"{split}); circles: the top {len(marked)}", label, clipped, label_size)
        draw_top_bars(ax_bars, marked, f"{model_label} model: largest TAC")
    fig.suptitle(f"Trigger Activation Change, {record}"
                 + (" (each layer divided by its maximum)" if normalized else ""), fontsize=12, y=1 - 0.15 / height)
    return fig


# --- na --------------------------------------------------------------------------------------------

def draw_profiles(ax_profile, ax_diff, clean, poisoned, names, marked, title: str, what: str):
    """Both profiles in the order of increasing clean activation; the difference below, with the
    `marked` neurons (largest difference first) named."""
    order = np.argsort(clean, kind="stable")
    x = np.arange(len(order))
    many = len(order) > 600
    ax_profile.plot(x, clean[order], color=CLEAN_COLOR, lw=1.5, label="clean twins", zorder=3)
    # Dots, not a line: in the clean order the poisoned values jump from one neuron to the next.
    ax_profile.plot(x, poisoned[order], ".", color=POISON_COLOR, ms=1.0 if many else 3.0, alpha=0.6 if many else 0.9,
                    label="poisoned")
    ax_profile.set_ylabel("mean activation")
    ax_profile.set_title(title, fontsize=10)
    ax_profile.legend(fontsize=8, loc="upper left", frameon=False)
    difference = poisoned - clean
    values = difference[order]
    # One bar per neuron, drawn as two step patches (rises, falls) rather than one Rectangle per
    # neuron: the same picture, without hundreds of artists to lay out and draw. With thousands of
    # neurons a bar is narrower than a pixel; unsmoothed, each still shows at full colour.
    edges = np.arange(len(order) + 1) - 0.5
    for part, color in ((np.where(values >= 0, values, 0.0), POISON_COLOR), (np.where(values < 0, values, 0.0),
                                                                               CLEAN_COLOR)):
        ax_diff.stairs(part, edges, baseline=0, fill=True, color=color, lw=0, antialiased=not many)
    ax_diff.axhline(0, color="black", lw=0.6)
    rank_of = np.empty(len(order), int)
    rank_of[order] = x
    for k, unit in enumerate(marked[:8]):  # more labels than this collide; the CSV and summary name all
        ax_diff.annotate(names[unit], (rank_of[unit], difference[unit]), xytext=(0, 6 + 9 * (k % 3)),
                         textcoords="offset points", fontsize=6.5, ha="center",
                         arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "gray"})
    ax_diff.set_ylabel("poisoned - clean")
    ax_diff.set_xlabel(f"{what} sorted by mean activation on clean twins")
    for ax in (ax_profile, ax_diff):
        ax.set_xlim(-0.5, len(order) - 0.5)


def na_figure(profiles: dict, layer: str, pairs: int, split: str, record: str, what: str):
    """profiles: {model label: (clean, poisoned, names, marked)}, per channel or per unit; one
    column per model. what: "channels" or "units (channel, position)"."""
    fig, axes = plt.subplots(2, len(profiles), figsize=(11 * len(profiles), 7.5), squeeze=False,
                             gridspec_kw={"height_ratios": [1.6, 1]}, sharex="col")
    for column, (label, (clean, poisoned, names, marked)) in enumerate(profiles.items()):
        draw_profiles(axes[0, column], axes[1, column], clean, poisoned, names, marked,
                      f"{label} model, {layer}: mean activation of {len(clean)} {what.split(' ')[0]}\n"
                      f"over {pairs} poisoned samples ({split}) and their clean twins", what)
    fig.suptitle(f"Neuron activation, {record}", fontsize=12)
    fig.tight_layout()
    return fig


# --- act -------------------------------------------------------------------------------------------

ACT_NEURONS_PER_PAGE = 8  # rows per figure
ACT_IMAGES_SHOWN = 12  # columns per figure; the CSV lists every image
ACT_MAX_PAGES = 8
ACT_NEURONS_SHOWN = ACT_NEURONS_PER_PAGE * ACT_MAX_PAGES


def short(name: str, width: int = 12) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def act_pages(pixels, poison, labels, indices, class_names, channels, values, positions, order_label: str,
              order_values, title: str) -> list:
    """Figures of top images, ACT_NEURONS_PER_PAGE channels (rows) and ACT_IMAGES_SHOWN images
    (columns) a page, at most ACT_MAX_PAGES pages.

    pixels: the split in pixel space (pixels[p][0] an image); poison, labels, indices: the split's
    arrays; values, positions: C x k activations and split positions of each channel's top images;
    order_values: per channel, shown beside the channel as `order_label` (None: nothing shown).
    """
    shown_images = min(values.shape[1], ACT_IMAGES_SHOWN)
    pages = math.ceil(len(channels) / ACT_NEURONS_PER_PAGE)
    figures = []
    for page in range(min(pages, ACT_MAX_PAGES)):
        rows = channels[page * ACT_NEURONS_PER_PAGE:(page + 1) * ACT_NEURONS_PER_PAGE]
        cols = shown_images
        fig, axes = plt.subplots(len(rows), cols, figsize=(max(4.2, 1.3 * cols + 1.2), 1.65 * len(rows) + 0.9),
                                 squeeze=False)
        for r, channel in enumerate(rows):
            for j in range(cols):
                ax = axes[r, j]
                pos = int(positions[channel, j])
                poisoned = bool(poison[pos])
                label = short(class_names[int(labels[pos])])
                text = f"{'poisoned → ' if poisoned else ''}{label}\n#{indices[pos]}  {values[channel, j]:.3g}"
                show_image(ax, pixels[pos][0], text, color=POISON_COLOR if poisoned else "black", fontsize=6.5)
                if poisoned:
                    for spine in ax.spines.values():
                        spine.set_edgecolor(POISON_COLOR); spine.set_linewidth(2)
            value = f"\n{order_label} {order_values[channel]:.3g}" if order_values is not None else ""
            axes[r, 0].set_ylabel(f"channel {channel}{value}", fontsize=8, rotation=0, ha="right", va="center",
                                  labelpad=8)
        note = f"; first {cols} of {values.shape[1]} per channel shown" if cols < values.shape[1] else ""
        page_note = f" (page {page + 1} of {min(pages, ACT_MAX_PAGES)})" if pages > 1 else ""
        fig.suptitle(f"{title}{page_note}\ntitles: label, dataset index, activation; red: poisoned{note}", fontsize=9)
        fig.tight_layout()
        figures.append(fig)
    return figures


# --- actdist ---------------------------------------------------------------------------------------

ACTDIST_LAYERS_PER_FIGURE = 6
OTHER_COLOR = "#bbbbbb"
KEPT_COLOR = "#ff9896"


def palette(count: int) -> list:
    """Distinct colours without red, which marks poisoned samples."""
    tab20 = plt.get_cmap("tab20").colors
    order = [0, 2, 4, 8, 10, 12, 14, 16, 18, 1, 3, 5, 9, 11, 13, 15, 17, 19]
    return [tab20[order[i % len(order)]] for i in range(count)]


def shown_groups(shares: dict, num_classes: int, limit: int = 12):
    """Classes drawn in their own colour (all when few, else the `limit - 2` largest overall),
    the rest pooled as 'other classes'; poisoned groups always separate."""
    total = sum(s.sum(0) for s in shares.values())
    if num_classes <= limit:
        classes = list(range(num_classes))
    else:
        classes = sorted(np.argsort(-total[:num_classes], kind="stable")[: limit - 2].tolist())
    colors = dict(zip(classes, palette(len(classes))))
    return classes, colors


def sort_key(shares: np.ndarray, poison_columns: list) -> np.ndarray:
    """Channels by poisoned share, then by purity (share of their most common group)."""
    poisoned = shares[:, poison_columns].sum(1) if poison_columns else np.zeros(len(shares))
    return np.lexsort((-shares.max(1), -poisoned))


def stacked_bars(ax, parts, width: float = 0.85):
    """Stacked bars drawn as one collection (thousands of separate bar patches draw slowly).

    parts: [(values per bar, colour, label)], bottom to top. Returns legend handles.
    """
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    bottom = np.zeros(len(parts[0][0]))
    verts, colors, handles = [], [], []
    for values, color, label in parts:
        for x, (low, height) in enumerate(zip(bottom, values)):
            if height > 0:
                left, right = x - width / 2, x + width / 2
                verts.append([(left, low), (right, low), (right, low + height), (left, low + height)])
                colors.append(color)
        bottom = bottom + values
        handles.append(Patch(facecolor=color, label=label))
    ax.add_collection(PolyCollection(verts, facecolors=colors, edgecolors="none"))
    return handles


def draw_layer(ax, layer, shares, names, num_classes, classes, colors, max_neurons, base_rate, k):
    poison_columns = list(range(num_classes, shares.shape[1]))
    order = sort_key(shares, poison_columns)[:max_neurons]
    parts = [(shares[order, column], POISON_COLOR if names[column] == "poisoned" else KEPT_COLOR, names[column])
             for column in poison_columns]
    parts += [(shares[order, c], colors[c], names[c]) for c in classes]
    if len(classes) < num_classes:
        parts.append((1.0 - sum(values for values, _, _ in parts), OTHER_COLOR, "other classes"))
    handles = stacked_bars(ax, parts)
    if base_rate > 0:
        handles.insert(0, ax.axhline(base_rate, color="black", ls="--", lw=0.8, label="poisoned share of the split"))
    # The channel numbers as plain texts under the bars, not as ticks: a page draws about 240 of
    # them, and a tick (two marks, two texts, made and then drawn) cost about 1.4 ms each.
    ax.set_xticks([])
    under_axis = offset_copy(ax.get_xaxis_transform(), fig=ax.figure, y=-3, units="points")
    for position, channel in enumerate(order):
        ax.text(position, 0, str(channel), transform=under_axis, rotation=90, ha="center", va="top",
                fontsize=6 if len(order) > 20 else 7)
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of top-k", fontsize=8)
    shown = f"the {len(order)} of {len(shares)} channels with the largest poisoned share" \
        if len(order) < len(shares) else f"all {len(shares)} channels, largest poisoned share first"
    # y given: the title sits on the panel (nothing is drawn above it) without matplotlib measuring
    # the panel's tick labels at every draw to place it.
    ax.set_title(f"{layer}: class make-up of each channel's top {k} images ({shown})", fontsize=9, y=1.0)
    return handles


def actdist_layer_pages(layers, shares: dict, names, num_classes: int, max_neurons: int, base_rate: float, k: int,
                        heading: str) -> list:
    """Figures of stacked bars, ACTDIST_LAYERS_PER_FIGURE layers each: per channel, the share of
    each group (names: the classes, then the poisoned groups) among its top-k samples. Laid out
    with fixed margins: save them uncropped (Output.save_figure crop=False)."""
    classes, colors = shown_groups(shares, num_classes)
    pages = math.ceil(len(layers) / ACTDIST_LAYERS_PER_FIGURE)
    figures = []
    for page in range(pages):
        chunk = layers[page * ACTDIST_LAYERS_PER_FIGURE:(page + 1) * ACTDIST_LAYERS_PER_FIGURE]
        width = max(8.0, 0.28 * min(max_neurons, max(len(shares[n]) for n in chunk)) + 3.5)
        fig, axes = plt.subplots(len(chunk), 1, figsize=(width, 2.3 * len(chunk) + 0.8), squeeze=False)
        for ax, layer in zip(axes[:, 0], chunk):
            handles = draw_layer(ax, layer, shares[layer], names, num_classes, classes, colors, max_neurons,
                                 base_rate, k)
            if ax is axes[0, 0]:
                legend_outside(ax, handles, [h.get_label() for h in handles])
        fig.suptitle(f"{heading}; x: channel" + (f"; layers {page + 1} of {pages}" if pages > 1 else ""), fontsize=10)
        # Fixed margins in inches (the legend on the right) instead of tight_layout or a cropped
        # save: each measures the figure with an extra draw of its thousands of tick labels, as
        # long as saving it. Every panel has the same furniture, so the space is known; save
        # these pages with crop=False.
        height = fig.get_figheight()
        fig.subplots_adjust(top=1 - 0.75 / height, bottom=0.45 / height, hspace=0.75 / 2.3, left=0.7 / width,
                            right=1 - 2.0 / width)
        figures.append(fig)
    return figures


def actdist_overview(layers, poisoned, largest, purity, base_rate: float, k: int, title: str):
    """Per layer: the mean poisoned share of its channels' top-k and the largest one (with
    poisoned samples), else the mean share of the most common class."""
    fig, ax = plt.subplots(figsize=(8, max(3.5, 0.22 * len(layers) + 1.5)))
    y = np.arange(len(layers))
    if base_rate > 0:
        ax.barh(y, poisoned, color=POISON_COLOR, alpha=0.8, label="mean over channels of the poisoned share")
        ax.plot(largest, y, "k|", ms=8, label="largest poisoned share of a channel")
        ax.axvline(base_rate, color="black", ls="--", lw=0.8, label=f"poisoned share of the split ({base_rate:.1%})")
        ax.set_xlabel(f"share of poisoned samples among each channel's top {k}")
    else:
        ax.barh(y, purity, color="#1f77b4", label="mean share of the most common class")
        ax.set_xlabel(f"share of the most common class among each channel's top {k}")
    ax.set_yticks(y)
    ax.set_yticklabels(layers, fontsize=6 if len(layers) > 25 else 7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_title(title, fontsize=10)
    legend_outside(ax)
    return fig


# --- fm --------------------------------------------------------------------------------------------

FM_MAPS_PER_ROW = 8


def draw_map(ax, fmap, title, vmin=None, vmax=None, cmap="viridis"):
    ax.imshow(fmap, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([]); ax.set_yticks([])
    ax.set_title(title, fontsize=7)


def fm_image_figure(image, maps: np.ndarray, means, channels, caption: str, title_color: str, heading: str):
    """The image, then the maps (C x H x W) of `channels` titled with their means, FM_MAPS_PER_ROW per row."""
    cols = min(len(channels), FM_MAPS_PER_ROW) + 1
    rows = int(np.ceil(len(channels) / FM_MAPS_PER_ROW))
    fig, axes = plt.subplots(rows, cols, figsize=(1.55 * cols + 0.3, 1.7 * rows + 0.9), squeeze=False)
    for r in range(rows):
        axes[r, 0].axis("off")
    show_image(axes[0, 0], image, caption, color=title_color, fontsize=7)
    axes[0, 0].axis("on")
    for k, channel in enumerate(channels):
        ax = axes[k // FM_MAPS_PER_ROW, 1 + k % FM_MAPS_PER_ROW]
        draw_map(ax, maps[channel], f"ch {channel}: {means[channel]:.3g}")
    for k in range(len(channels), rows * FM_MAPS_PER_ROW):
        if 1 + k % FM_MAPS_PER_ROW < cols:
            axes[k // FM_MAPS_PER_ROW, 1 + k % FM_MAPS_PER_ROW].axis("off")
    fig.suptitle(f"{heading} ({maps.shape[0]} channels, maps {maps.shape[1]}x{maps.shape[2]}): "
                 f"the {len(channels)} maps with the largest mean activation\n(each map on its own colour scale; "
                 f"title: channel and mean activation)", fontsize=9)
    fig.tight_layout()
    return fig


def fm_pair_figure(poisoned_img, clean_img, poisoned_maps, clean_maps, change, channels, heading: str,
                   caption: str):
    """Blocks of three rows (poisoned, clean twin, difference) for `channels`; the images in the
    first column. Maps C x H x W; change: per channel, mean |poisoned - clean| over positions."""
    per_row = min(len(channels), FM_MAPS_PER_ROW)
    blocks = int(np.ceil(len(channels) / per_row))
    fig, axes = plt.subplots(3 * blocks, per_row + 1, figsize=(1.55 * (per_row + 1) + 0.6, 1.65 * 3 * blocks + 1.0),
                             squeeze=False)
    for ax in axes[:, 0]:
        ax.axis("off")
    show_image(axes[0, 0], poisoned_img, "poisoned", color=POISON_COLOR, fontsize=8)
    show_image(axes[1, 0], clean_img, "clean twin", fontsize=8)
    delta = (poisoned_img - clean_img).abs().amax(dim=0)
    show_image(axes[2, 0], delta / max(float(delta.max()), 1e-8), "|pixel difference|\n(scaled to max)", fontsize=7)
    for ax in axes[:3, 0]:
        ax.axis("on")
    for k, channel in enumerate(channels):
        block, col = divmod(k, per_row)
        p, c = poisoned_maps[channel], clean_maps[channel]
        low, high = float(min(p.min(), c.min())), float(max(p.max(), c.max()))
        diff = p - c
        bound = max(float(np.abs(diff).max()), 1e-8)
        draw_map(axes[3 * block, col + 1], p, f"ch {channel} poisoned", low, high)
        draw_map(axes[3 * block + 1, col + 1], c, f"ch {channel} clean", low, high)
        draw_map(axes[3 * block + 2, col + 1], diff, f"difference\nmean |Δ| {change[channel]:.3g}",
                 -bound, bound, cmap="RdBu_r")
    for k in range(len(channels), blocks * per_row):
        block, col = divmod(k, per_row)
        for r in range(3):
            axes[3 * block + r, col + 1].axis("off")
    fig.suptitle(f"{heading}: the {len(channels)} maps the trigger changes most; {caption}\n"
                 f"poisoned and clean maps share a colour scale per channel; difference = poisoned - clean "
                 f"(red: higher with the trigger)", fontsize=9)
    fig.tight_layout()
    return fig
