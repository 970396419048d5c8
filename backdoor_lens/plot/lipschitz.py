"""The channel-Lipschitz heat map: one row per layer, one column per channel, CLP's outliers circled."""
import numpy as np

from backdoor_lens.plot.base import plt, side_by_side


def heat_matrix(units, normalize: bool) -> np.ndarray:
    """Layers x channels, NaN past a layer's last channel; each row over its maximum when normalize."""
    width = max(len(u.values) for u in units)
    matrix = np.full((len(units), width), np.nan)
    for row, unit in enumerate(units):
        values = unit.values
        if normalize:
            top = values.max()
            values = values / top if top > 0 else values
        matrix[row, :len(values)] = values
    return matrix


def draw_heat(ax, units, title: str, normalize: bool, u: float, vmax: float):
    matrix = heat_matrix(units, normalize)
    cmap = plt.get_cmap("Oranges").with_extremes(bad="white")
    image = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    ys, xs = [], []
    for row, unit in enumerate(units):
        ys += [row] * len(unit.flagged)
        xs += unit.flagged.tolist()
    if xs:
        ax.scatter(xs, ys, s=10, marker="o", facecolors="none", edgecolors="#1f77b4", linewidths=0.8,
                   label=f"above mean + {u:g} std of its layer")
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.06), fontsize=7, frameon=False)
    ax.set_yticks(range(len(units)))
    ax.set_yticklabels([f"{u.name} [{u.kind}]" for u in units], fontsize=6 if len(units) > 30 else 7)
    ax.set_xlabel("channel")
    ax.set_title(title, fontsize=10)
    return image


def lipschitz_figure(results: dict, u: float, normalize: bool, pairing: str, record: str):
    """results: {model label: [LayerLipschitz units]}; one panel per model on one colour scale."""
    rows_per_model = max(len(units) for units in results.values())
    fig, axes = side_by_side(len(results), width=9, height=max(4.0, 0.2 * rows_per_model + 1.5))
    fig.subplots_adjust(wspace=0.4)  # room for the next panel's layer names
    # One colour scale for all panels, so that attack and defense compare directly.
    vmax = 1.0 if normalize else max(float(unit.values.max()) for units in results.values()
                                     for unit in units if len(unit.values))
    for ax, (label, units) in zip(axes, results.items()):
        flagged = sum(len(unit.flagged) for unit in units)
        channels = sum(len(unit.values) for unit in units)
        image = draw_heat(ax, units, f"{label} model: {flagged} of {channels} channels above mean + {u:g} std",
                          normalize, u, vmax or 1.0)
    fig.colorbar(image, ax=list(axes), fraction=0.02 if len(axes) > 1 else 0.03, pad=0.02,
                 label="Lipschitz bound / layer max" if normalize else "channel Lipschitz bound")
    fig.suptitle(f"Channel Lipschitz upper bounds ({pairing} pairing), {record}", fontsize=11)
    return fig
