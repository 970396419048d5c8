"""The trigger-visibility figure: clean image, poisoned image and their amplified difference, per pair."""
import math

from backdoor_lens.plot.base import plt, show_image


def examples_figure(examples, names, title: str):
    """examples: [(original index, original label, clean C x H x W, poisoned C x H x W, PSNR)], three rows each."""
    n = len(examples)
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(3 * rows, cols, figsize=(max(3.0, 1.8 * cols), 5.6 * rows + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (idx, label, xc, xp, psnr) in enumerate(examples):
        r, c = 3 * (k // cols), k % cols
        show_image(axes[r, c], xc, f"#{idx} ({names[label]})\nclean", fontsize=7)
        show_image(axes[r + 1, c], xp, f"poisoned\nPSNR {psnr:.1f} dB", color="#d62728", fontsize=7)
        diff = (xp - xc).abs().amax(dim=0).numpy()
        top = diff.max()
        ax = axes[r + 2, c]
        ax.imshow(diff / top if top > 0 else diff, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([]); ax.set_yticks([]); ax.axis("on")
        ax.set_title(f"|difference| x{1 / top:.1f}" if top > 0 else "no difference", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig
