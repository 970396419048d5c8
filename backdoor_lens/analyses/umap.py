"""UMAP of a layer's features: as t-SNE (backdoor-lens tsne --help), with umap-learn's embedding.

The same pipeline (backdoor_lens/analyses/_embedding.py): the layer's output, PCA to --pca_dim,
the 2-D embedding, poisoned samples marked, their separability from the target class scored.
UMAP keeps more of the global structure than t-SNE: --n_neighbors sets the neighbourhood its
graph is built from, --min_dist how tightly it packs the embedded points.
"""
from backdoor_lens.analyses._embedding import add_common_arguments, common_settings, compute, write
from backdoor_lens.analysis import Analysis
from backdoor_lens.errors import UserError
from backdoor_lens.report.numbers import separation_numbers


def add_arguments(parser):
    add_common_arguments(parser)
    parser.add_argument("--n_neighbors", type=int, default=15, help="UMAP neighbourhood size (capped at samples - 1)")
    parser.add_argument("--min_dist", type=float, default=0.1, help="UMAP minimum distance between embedded points")


def settings(args):
    if args.n_neighbors < 2:
        raise UserError(f"--n_neighbors {args.n_neighbors} must be at least 2")
    if args.min_dist < 0:
        raise UserError(f"--min_dist {args.min_dist} must not be negative")
    return common_settings(args, "umap", n_neighbors=args.n_neighbors, min_dist=args.min_dist)


ANALYSIS = Analysis(
    name="umap", title="UMAP of features", order=3,
    guide="As t-SNE, with better global structure: a separate poisoned cluster means the layer separates "
          "triggered inputs.",
    shows="a 2-D UMAP embedding of a layer's features, poisoned samples marked",
    compute=compute, write=write, settings=settings, add_arguments=add_arguments, key_numbers=separation_numbers,
    splits=("bd_train", "mixed", "clean_test", "clean_train", "subset"), default_split="bd_train",
    demo_args=("--n_sub", "600"), quick_args=("--n_sub", "24"))
