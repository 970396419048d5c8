"""t-SNE of a layer's features: do the poisoned samples form a cluster of their own?

The layer's output (--target_layer_name, default the model's last conv block; --pool) is reduced
by PCA to --pca_dim dimensions and embedded in 2-D by openTSNE, which keeps local neighbourhoods
(--perplexity: about how many neighbours each point has). Poisoned samples are black crosses over
the class-coloured clean ones, cross samples (flagged, label kept) triangles; the silhouette and
k-NN purity of poisoned vs target-class clean samples, in the embedding and in the PCA'd
features, say how separable they are. Default split bd_train (records without it: mixed, else
clean_test); with a defense, both models side by side. The pipeline is shared with umap
(backdoor_lens/analyses/_embedding.py).
"""
from backdoor_lens.analyses._embedding import add_common_arguments, common_settings, compute, write
from backdoor_lens.analysis import Analysis
from backdoor_lens.errors import UserError
from backdoor_lens.report.numbers import separation_numbers


def add_arguments(parser):
    add_common_arguments(parser)
    parser.add_argument("--perplexity", type=float, default=30.0,
                        help="t-SNE perplexity (capped at (samples - 1) / 3)")


def settings(args):
    if args.perplexity <= 0:
        raise UserError(f"--perplexity {args.perplexity} must be positive")
    return common_settings(args, "tsne", perplexity=args.perplexity)


ANALYSIS = Analysis(
    name="tsne", title="t-SNE of features", order=2,
    guide="Poisoned samples that form a tight cluster of their own, away from the clean samples of the target "
          "class, show that the layer encodes the trigger as a separate feature. The JSON's separation scores say "
          "how separable they are.",
    shows="a 2-D t-SNE embedding of the features of a layer (the last convolutional block by default), with "
          "poisoned samples as a group of their own",
    compute=compute, write=write, settings=settings, add_arguments=add_arguments, key_numbers=separation_numbers,
    splits=("bd_train", "mixed", "clean_test", "clean_train", "subset"), default_split="bd_train",
    compares=True, on_blended_demo=True, demo_args=("--n_sub", "600"), quick_args=("--n_sub", "24"))
