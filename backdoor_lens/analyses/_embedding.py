"""What t-SNE and UMAP share: do the poisoned samples form a cluster of their own in a layer's features?

The layer's output (--target_layer_name, default the model's last conv block), flattened per
sample (--pool avg: averaged per channel), is reduced by PCA to --pca_dim dimensions and embedded
in 2-D (backdoor_lens.stats.embedding). Poisoned samples are drawn as black crosses over the
class-coloured clean ones; WaNet-style cross samples (flagged, label kept) as triangles.
Separability of poisoned vs target-class clean samples is measured in the embedding and in the
PCA'd features (silhouette, k-NN purity). Default split bd_train; records without it fall back to
the first declared split they have (mixed, else clean_test). With a defense, both models are
embedded side by side. tsne.py and umap.py declare the two analyses with this compute and write.

Threads (--n_jobs, default every core the process may use): t-SNE runs its neighbour search and
gradient steps on all of them; UMAP, seeded for reproducibility, runs umap-learn's layout on one
thread (umap-learn parallelises only unseeded runs) and only its exact neighbour graph and the PCA
on several. The embeddings are the same for any thread count (backdoor_lens/stats/embedding.py).
"""
from dataclasses import dataclass, field

import pandas as pd

from backdoor_lens.errors import UserError
from backdoor_lens.plot.embedding import embedding_figure
from backdoor_lens.record.splits import AUTO
from backdoor_lens.stats.embedding import CROSS, GROUP_NAMES, POISONED, compute_embedding, resolve_jobs
from backdoor_lens.stats.features import collect_features

TITLES = {"tsne": "t-SNE", "umap": "UMAP"}
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
    group.add_argument("--n_jobs", type=int, default=0,
                       help="threads for the embedding; 0 or -1 (default): every core this process may use. "
                            "t-SNE uses them all; UMAP, seeded, runs its layout optimisation on one (umap-learn "
                            "parallelises only unseeded runs) and its exact neighbour graph and PCA on all. "
                            "The result does not depend on the count; lower it when other jobs share the cores")


@dataclass(frozen=True)
class Settings:
    method: str  # "tsne" or "umap"
    pool: str
    pca_dim: int
    knn: int
    n_jobs: int  # resolved: the threads used (never 0)
    seed: int
    options: dict = field(default_factory=dict)  # the method's own parameters (perplexity; n_neighbors, min_dist)


def common_settings(args, method: str, **options) -> Settings:
    """The shared flags, checked, and the method's own parameters (checked by its module)."""
    for flag, low in (("pca_dim", 1), ("knn", 1), ("n_jobs", -1)):
        if getattr(args, flag) < low:
            raise UserError(f"--{flag} {getattr(args, flag)} must be at least {low}"
                            + (" (0 or -1: every core)" if flag == "n_jobs" else ""))
    return Settings(method, args.pool, args.pca_dim, args.knn, resolve_jobs(args.n_jobs), args.seed, options)


@dataclass
class ModelEmbedding:
    layer: str
    arrays: dict  # indices, labels, original_labels, poison, predicted per sample; feature_dim
    emb: object  # backdoor_lens.stats.embedding.Embedding
    attack_success: float | None  # share of poisoned samples predicted as their served label


@dataclass
class EmbeddingResult:
    method: str
    pool: str
    split: str
    samples: int
    record: str
    class_names: list
    target: int | None
    note: str | None  # why the split differs from the one asked for, or says little
    models: dict  # {model label: ModelEmbedding}
    model_label: str  # the model under analysis (the defense's when there is one)
    threads: int = 1  # --n_jobs as resolved


def choose_split(ctx) -> tuple[str, str | None]:
    """The split to embed, and a note when it differs from the one asked for or says little."""
    requested = ctx.split_name()
    record = ctx.record
    if requested in ("bd_train", "subset") and record.bd_train is None:
        fallback = ctx.split_name(AUTO)  # the first declared split the record has
        why = "poisons through training" if record.bd_test is not None else "has no poisoned samples"
        return fallback, f"this record {why} (no bd_train); embedding {fallback} instead of {requested}"
    if requested == "bd_test":
        return requested, ("bd_test holds only poisoned samples, so there is no clean group to separate them "
                           "from; use mixed to compare")
    return requested, None


def attack_success(groups, labels, predicted):
    """Share of poisoned samples predicted as their served (attack) label: without the backdoor
    learnt, no separation is to be expected."""
    poisoned = groups == POISONED
    return float((labels[poisoned] == predicted[poisoned]).mean()) if poisoned.any() else None


def embed_model(ctx, model, s: Settings) -> ModelEmbedding:
    """One pass over the split for one model's layer, then the embedding."""
    layer = ctx.layer_name(model)
    feats, labels, originals, poison, indices, predicted = collect_features(
        model, ctx.loader(ctx.split), layer, ctx.device, how=s.pool, desc=f"{s.method} features")
    emb = compute_embedding(feats, labels, originals, poison, ctx.target_class, method=s.method, pca_dim=s.pca_dim,
                            k=s.knn, seed=s.seed, n_jobs=s.n_jobs, **s.options)
    arrays = {"indices": indices, "labels": labels, "original_labels": originals, "poison": poison,
              "predicted": predicted, "feature_dim": int(feats.shape[1])}
    return ModelEmbedding(layer, arrays, emb, attack_success(emb.groups, labels, predicted))


def compute(ctx, s: Settings) -> EmbeddingResult:
    """Every model's features of one layer on the chosen split, embedded."""
    name, note = choose_split(ctx)
    split = ctx.use_split(name)
    models = {label: embed_model(ctx, model, s) for label, model in ctx.models.items()}
    return EmbeddingResult(s.method, s.pool, split.name, len(split), ctx.record.name, list(ctx.class_names),
                           ctx.target_class, note, models, ctx.model_label, s.n_jobs)


# --- write -----------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


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


def report_line(label: str, layer: str, result: EmbeddingResult, emb) -> str:
    """The printed line: the separation score (silhouette in the embedding) and its companions."""
    head = (f"{label} model, {layer}, {result.split} ({result.samples} samples, {(emb.groups == POISONED).sum()} "
            f"poisoned)")
    m, f = emb.metrics["embedding"], emb.metrics["features"]
    title = TITLES[result.method]
    if m["knn_purity_poisoned"] is None:
        return f"{head}: {title}: {_no_separation(emb)}"
    return (f"{head}: {title} separation score (silhouette, poisoned vs target-class clean) "
            f"{_fmt(m['silhouette_poisoned_vs_target_clean'])} (PCA features "
            f"{_fmt(f['silhouette_poisoned_vs_target_clean'])}); {m['knn_k']}-NN purity "
            f"{_fmt(m['knn_purity_poisoned'])} (PCA features {_fmt(f['knn_purity_poisoned'])}, "
            f"chance {_fmt(m['knn_purity_chance'])})")


def points_table(emb, arrays: dict) -> pd.DataFrame:
    return pd.DataFrame({
        "index": arrays["indices"], "x": emb.coords[:, 0], "y": emb.coords[:, 1], "label": arrays["labels"],
        "original_label": arrays["original_labels"], "poison": arrays["poison"].astype(int),
        "group": [GROUP_NAMES[g] for g in emb.groups], "predicted": arrays["predicted"],
    })


def write(result: EmbeddingResult, ctx) -> dict:
    """Per model the points CSV and the printed line; the figure, the separability JSON; the summary."""
    method = result.method
    if result.note:
        print(result.note)
    summary = {"method": method, "split": result.split, "samples": result.samples, "threads": result.threads}
    details, panels = {}, []
    for label, model in result.models.items():
        emb, layer = model.emb, model.layer
        ctx.out.save_csv(f"{method}_points_{label}", points_table(emb, model.arrays))
        details[label] = {"layer": layer, "pool": result.pool, "feature_dim": model.arrays["feature_dim"],
                          "pca_dim": int(emb.reduced.shape[1]), "pca_explained_variance": emb.explained_variance,
                          "poisoned": int((emb.groups == POISONED).sum()), "cross": int((emb.groups == CROSS).sum()),
                          "poisoned_predicted_as_label": model.attack_success, **emb.metrics}
        panels.append((emb, model.arrays["labels"], metrics_title(label, layer, emb)))
        m, f = emb.metrics["embedding"], emb.metrics["features"]
        summary.update({f"layer_{label}": layer,
                        f"silhouette_{label}": m["silhouette_poisoned_vs_target_clean"],
                        f"silhouette_features_{label}": f["silhouette_poisoned_vs_target_clean"],
                        f"knn_purity_{label}": m["knn_purity_poisoned"],
                        f"knn_purity_features_{label}": f["knn_purity_poisoned"]})
        print(report_line(label, layer, result, emb))
    main = details[result.model_label]
    summary.update({"separation_score": summary[f"silhouette_{result.model_label}"], "poisoned": main["poisoned"],
                    "cross": main["cross"], "knn_purity_chance": main["embedding"]["knn_purity_chance"]})
    dims = panels[0][0].reduced.shape[1]
    ctx.out.save_figure(embedding_figure(panels, result.class_names, result.target,
                                         f"{TITLES[method]} of layer features, {result.record}, {result.split} "
                                         f"({result.samples} samples, PCA to {dims} dims first)"), method)
    ctx.out.save_json(f"{method}_separability", {"split": result.split, "samples": result.samples,
                                                 "target": result.target, "models": details, "note": result.note})
    return summary
