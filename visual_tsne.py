"""t-SNE of a layer's features: do the poisoned samples form a cluster of their own?

The layer's output (--target_layer_name, default the model's last conv block), flattened per
sample (--pool avg: averaged per channel), is reduced by PCA to --pca_dim dimensions and embedded
in 2-D with openTSNE. Poisoned samples are drawn as black crosses over the class-coloured clean
ones; WaNet-style cross samples (flagged, label kept) as triangles. Separability of poisoned vs
target-class clean samples is measured in the embedding and in the PCA'd features (silhouette,
k-NN purity). Default split bd_train; records without it fall back to mixed (or clean_test).
With a defense, both models are embedded side by side.
"""
from utils.cli import main
from utils.embedding_run import add_common_arguments, run_embedding
from utils.errors import UserError

DEMO_ARGS = ["--n_sub", "600"]


def add_arguments(parser):
    add_common_arguments(parser)
    parser.add_argument("--perplexity", type=float, default=30.0,
                        help="t-SNE perplexity (capped at (samples - 1) / 3)")


def run(args) -> dict:
    if args.perplexity <= 0:
        raise UserError(f"--perplexity {args.perplexity} must be positive")
    return run_embedding(args, "tsne", perplexity=args.perplexity)


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__, default_split="bd_train")
