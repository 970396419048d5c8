"""The shared body of visual_tsne.py and visual_umap.py: split choice, one feature pass per model,
the embedding (utils.embedding), the figure, the per-sample CSV and the separability JSON."""
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from .context import load_context
from .embedding import CLEAN, CROSS, GROUP_NAMES, POISONED, compute_embedding
from .errors import UserError
from .features import collect_features
from .plotting import class_colors, legend_outside, side_by_side

TITLES = {"tsne": "t-SNE", "umap": "UMAP"}
MAX_LEGEND_CLASSES = 20
DEFAULT_N_SUB = 5000


def add_common_arguments(parser):
    # Feature memory is N x D (8192 for PreAct-ResNet-18's last block) and t-SNE grows with N:
    # all 50000 CIFAR-10 training images would need gigabytes for a picture 5000 show as well.
    parser.set_defaults(n_sub=DEFAULT_N_SUB)
    group = parser.add_argument_group("embedding")
    group.add_argument("--pool", choices=("flatten", "avg"), default="flatten",
                       help="layer output per sample: flattened C*H*W ('flatten', keeps where a trigger sits) "
                            "or averaged over positions to C values ('avg', for very large layers)")
    group.add_argument("--pca_dim", type=int, default=50, help="PCA components kept before the embedding")
    group.add_argument("--knn", type=int, default=10, help="k of the k-NN purity of poisoned points")
    group.add_argument("--n_jobs", type=int, default=1,
                       help="threads for the embedding (more than the free cores slows it down)")


def check_common_arguments(args):
    for flag, low in (("pca_dim", 1), ("knn", 1), ("n_jobs", 1)):
        if getattr(args, flag) < low:
            raise UserError(f"--{flag} {getattr(args, flag)} must be at least {low}")


def choose_split(record, requested: str) -> tuple[str, str | None]:
    """The split to embed, and a note when it differs from the one asked for or says little."""
    if requested in ("bd_train", "subset") and record.bd_train is None:
        fallback = "mixed" if record.bd_test is not None else "clean_test"
        why = "poisons through training" if record.bd_test is not None else "has no poisoned samples"
        return fallback, f"this record {why} (no bd_train); embedding {fallback} instead of {requested}"
    if requested == "bd_test":
        return requested, ("bd_test holds only poisoned samples, so there is no clean group to separate them "
                           "from; use mixed to compare")
    return requested, None


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def draw_embedding(ax, emb, labels, class_names, target, title: str):
    """Clean samples as class-coloured dots; poisoned (black x) and cross (black triangle) on top."""
    labels = np.asarray(labels)
    n = len(labels)
    size = float(np.clip(4000.0 / n, 3.0, 30.0))
    colors = class_colors(len(class_names))
    clean = emb.groups == CLEAN
    handles, names = [], []
    many = len(np.unique(labels[clean])) > MAX_LEGEND_CLASSES
    for cls in np.unique(labels[clean]):
        keep = clean & (labels == cls)
        if many and cls == target:
            # Among dozens of similar hues the target class needs a shape of its own.
            handle = ax.scatter(emb.coords[keep, 0], emb.coords[keep, 1], s=size * 1.5 + 4, marker="s",
                                color=colors[cls], edgecolors="black", linewidths=0.6, zorder=3)
        else:
            handle = ax.scatter(emb.coords[keep, 0], emb.coords[keep, 1], s=size, color=colors[cls], alpha=0.75,
                                linewidths=0, zorder=2)
        handles.append(handle)
        names.append(class_names[cls] + (" (target)" if cls == target else ""))
    on_top = []
    poisoned = emb.groups == POISONED
    if poisoned.any():
        served = np.unique(labels[poisoned])
        label = f"poisoned \u2192 {class_names[served[0]]}" if len(served) == 1 else "poisoned (attack labels)"
        on_top.append((ax.scatter(emb.coords[poisoned, 0], emb.coords[poisoned, 1], s=size * 2.0 + 6, marker="x",
                                  color="black", linewidths=1.0, zorder=4), f"{label} ({poisoned.sum()})"))
    cross = emb.groups == CROSS
    if cross.any():
        on_top.append((ax.scatter(emb.coords[cross, 0], emb.coords[cross, 1], s=size * 2.0 + 6, marker="^",
                                  facecolors="none", edgecolors="black", linewidths=0.9, zorder=3),
                       f"cross: flagged, label kept ({cross.sum()})"))
    ax.set_xticks([]); ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    shown = list(np.unique(labels[clean]))
    if many:
        # Dozens of near-identical hues say nothing: keep the target class and summarise the rest.
        keep = [i for i, cls in enumerate(shown) if cls == target]
        handles = [handles[i] for i in keep] + [Line2D([], [], linestyle="none", marker="o", markersize=5,
                                                       color="#bbbbbb")]
        names = [names[i] for i in keep] + [f"{len(shown) - len(keep)} other classes (one hue each)"]
    return [h for h, _ in on_top] + handles, [t for _, t in on_top] + names


def _no_separation(emb) -> str:
    """Why no poisoned-vs-clean separation is shown for this embedding."""
    if not (emb.groups == POISONED).any():
        return f"no poisoned samples; class silhouette {_fmt(emb.metrics['embedding']['silhouette_clean_classes'])}"
    return "only poisoned samples, nothing to separate them from"


def metrics_title(label: str, layer: str, emb) -> str:
    m, feat = emb.metrics["embedding"], emb.metrics["features"]
    if m["knn_purity_poisoned"] is None:
        return f"{label} model, {layer}\n{_no_separation(emb)}"
    sil, sil_feat = m["silhouette_poisoned_vs_target_clean"], feat["silhouette_poisoned_vs_target_clean"]
    return (f"{label} model, {layer}\npoisoned vs target class: silhouette {_fmt(sil)} (features {_fmt(sil_feat)})\n"
            f"{m['knn_k']}-NN purity {_fmt(m['knn_purity_poisoned'])} (features {_fmt(feat['knn_purity_poisoned'])},"
            f" chance {_fmt(m['knn_purity_chance'])})")


def attack_success(groups, labels, predicted):
    """Share of poisoned samples predicted as their served (attack) label: without the backdoor
    learnt, no separation is to be expected."""
    poisoned = groups == POISONED
    return float((labels[poisoned] == predicted[poisoned]).mean()) if poisoned.any() else None


def points_table(emb, arrays: dict) -> pd.DataFrame:
    return pd.DataFrame({
        "index": arrays["indices"], "x": emb.coords[:, 0], "y": emb.coords[:, 1], "label": arrays["labels"],
        "original_label": arrays["original_labels"], "poison": arrays["poison"].astype(int),
        "group": [GROUP_NAMES[g] for g in emb.groups], "predicted": arrays["predicted"],
    })


def report_line(label: str, layer: str, split, emb, title: str) -> str:
    """The printed line: the separation score (silhouette in the embedding) and its companions."""
    head = f"{label} model, {layer}, {split.name} ({len(split)} samples, {(emb.groups == POISONED).sum()} poisoned)"
    m, f = emb.metrics["embedding"], emb.metrics["features"]
    if m["knn_purity_poisoned"] is None:
        return f"{head}: {title}: {_no_separation(emb)}"
    return (f"{head}: {title} separation score (silhouette, poisoned vs target-class clean) "
            f"{_fmt(m['silhouette_poisoned_vs_target_clean'])} (PCA features "
            f"{_fmt(f['silhouette_poisoned_vs_target_clean'])}); {m['knn_k']}-NN purity "
            f"{_fmt(m['knn_purity_poisoned'])} (PCA features {_fmt(f['knn_purity_poisoned'])}, "
            f"chance {_fmt(m['knn_purity_chance'])})")


def embed_model(ctx, model, args, method: str, options: dict):
    """One pass over the split for one model's layer, then the embedding: (layer, arrays, Embedding)."""
    layer = ctx.layer_name(model)
    feats, labels, originals, poison, indices, predicted = collect_features(
        model, ctx.loader(ctx.split), layer, ctx.device, how=args.pool, desc=f"{method} features")
    emb = compute_embedding(feats, labels, originals, poison, ctx.target_class, method=method, pca_dim=args.pca_dim,
                            k=args.knn, seed=args.seed, n_jobs=args.n_jobs, **options)
    arrays = {"indices": indices, "labels": labels, "original_labels": originals, "poison": poison,
              "predicted": predicted, "feature_dim": int(feats.shape[1])}
    return layer, arrays, emb


def run_embedding(args, method: str, **options) -> dict:
    """Load, embed every model's features of one layer, write figure, CSV and JSON; return the summary."""
    check_common_arguments(args)
    title = TITLES[method]
    with load_context(args, method, split=None) as ctx:
        name, note = choose_split(ctx.record, args.visual_dataset)
        if note:
            print(note)
        split = ctx.split = ctx.get_split(name, n_sub=args.n_sub, c_sub=args.c_sub)
        summary = {"method": method, "split": split.name, "samples": len(split)}
        details, panels = {}, []
        for label, model in ctx.models.items():
            layer, arrays, emb = embed_model(ctx, model, args, method, options)
            ctx.out.save_csv(f"{method}_points_{label}", points_table(emb, arrays))
            details[label] = {"layer": layer, "pool": args.pool, "feature_dim": arrays["feature_dim"],
                              "pca_dim": int(emb.reduced.shape[1]), "pca_explained_variance": emb.explained_variance,
                              "poisoned": int((emb.groups == POISONED).sum()),
                              "cross": int((emb.groups == CROSS).sum()),
                              "poisoned_predicted_as_label": attack_success(emb.groups, arrays["labels"],
                                                                            arrays["predicted"]),
                              **emb.metrics}
            panels.append((label, layer, emb, arrays["labels"]))
            m, f = emb.metrics["embedding"], emb.metrics["features"]
            summary.update({f"layer_{label}": layer,
                            f"silhouette_{label}": m["silhouette_poisoned_vs_target_clean"],
                            f"silhouette_features_{label}": f["silhouette_poisoned_vs_target_clean"],
                            f"knn_purity_{label}": m["knn_purity_poisoned"],
                            f"knn_purity_features_{label}": f["knn_purity_poisoned"]})
            print(report_line(label, layer, split, emb, title))
        main = details[ctx.model_label]
        summary.update({"separation_score": summary[f"silhouette_{ctx.model_label}"], "poisoned": main["poisoned"],
                        "cross": main["cross"], "knn_purity_chance": main["embedding"]["knn_purity_chance"]})
        ctx.out.save_figure(draw_figure(panels, list(ctx.class_names), ctx.target_class,
                                        f"{title} of layer features, {ctx.record.name}, {split.name} ({len(split)} "
                                        f"samples, PCA to {panels[0][2].reduced.shape[1]} dims first)"), method)
        ctx.out.save_json(f"{method}_separability", {"split": split.name, "samples": len(split),
                                                     "target": ctx.target_class, "models": details, "note": note})
        ctx.out.save_json("summary", summary)
        return ctx.finish(summary)


def draw_figure(panels, names, target, suptitle: str):
    """One panel per model, side by side, one legend for all."""
    fig, axes = side_by_side(len(panels), width=6.0, height=5.6)
    for ax, (label, layer, emb, labels) in zip(axes, panels):
        legend = draw_embedding(ax, emb, labels, names, target, metrics_title(label, layer, emb))
    legend_outside(axes[-1], *legend, title="served label")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig
