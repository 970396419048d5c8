"""2-D embeddings of layer features (t-SNE, UMAP) and how separable the poisoned samples are.

Pipeline: features N x D -> PCA to d = min(pca_dim, N, D) components (centred, not whitened) ->
openTSNE or umap-learn -> N x 2. PCA first because t-SNE's neighbour search and UMAP's graph
are slow and noisy on thousands of raw dimensions (BackdoorBench ran t-SNE on 8192-D features).

Groups of samples (poison flag p, served label y, original label y0, attack target t):
    clean     p = 0
    cross     p = 1 and y = y0 != t  (WaNet/InputAware "cross"/noise samples: flagged, label kept)
    poisoned  p = 1 otherwise        (the backdoor samples, including target-class ones relabelled to t)

Separability, measured both in the 2-D embedding and in the PCA'd features:
    silhouette(A, B): the mean over x in A u B of s(x) = (b(x) - a(x)) / max(a(x), b(x)), where a(x)
        is the mean Euclidean distance from x to the other members of its own group and b(x) the mean
        distance to the other group (s = 0 for a group of one); +1 = apart, 0 = overlapping.
        Reported for poisoned vs the clean samples of the poisoned samples' served labels (the
        target class): the samples the model must tell apart without the trigger. (Against all
        clean samples it would mostly measure how spread out the other classes are.)
    k-NN purity: the mean over poisoned x of |{j in kNN(x): j poisoned}| / k, the neighbours taken
        among all other samples. Chance level, for poisoned points scattered at random, is
        (P - 1) / (N - 1) for P poisoned samples of N.

Threads and reproducibility. Both embeddings are seeded, and their results must not depend on the
machine, so the neighbour searches are exact (scikit-learn's brute force, which `n_jobs` threads
share and whose answer does not depend on their number); approximate searches (Annoy, NN-descent)
answer differently with another thread count. t-SNE: openTSNE spreads the neighbour search and
every gradient step over `n_jobs` threads (its Barnes-Hut and FFT gradients give the same numbers
for any count). UMAP: umap-learn runs single-threaded whenever it is seeded (it overrides n_jobs
to 1 under random_state, as its parallel layout is not reproducible), so only the neighbour graph
we hand it (`precomputed_knn`) and the PCA before it use several cores; the layout optimisation,
most of UMAP's time, stays on one. umap-learn also compiles its numba functions in every new
process (about 20 s on 2 cores): `import_umap` has numba keep them on disk (NUMBA_CACHE_DIR, see
`numba_cache_dir`), so that the compilation happens once per environment.
"""
from dataclasses import dataclass, field
import os
from pathlib import Path
import sys
import warnings

import numpy as np

from backdoor_lens.errors import UserError

CLEAN, POISONED, CROSS = 0, 1, 2
GROUP_NAMES = {CLEAN: "clean", POISONED: "poisoned", CROSS: "cross"}
METHODS = ("tsne", "umap")
MIN_SAMPLES = 5


def sample_groups(labels, original_labels, poison, target: int | None) -> np.ndarray:
    """CLEAN / POISONED / CROSS per sample (see the module docstring)."""
    labels, original_labels = np.asarray(labels), np.asarray(original_labels)
    poison = np.asarray(poison, dtype=bool)
    kept = labels == original_labels
    if target is not None:
        kept &= labels != target
    groups = np.full(len(labels), CLEAN, dtype=np.int64)
    groups[poison & ~kept] = POISONED
    groups[poison & kept] = CROSS
    return groups


def reduce_pca(features: np.ndarray, pca_dim: int = 50, seed: int = 0) -> tuple[np.ndarray, float]:
    """Project centred features onto their first min(pca_dim, N, D) principal axes.

    Returns (N x d projections, share of the variance those d axes keep).
    """
    from sklearn.decomposition import PCA

    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be N x D, got shape {features.shape}")
    n, dims = features.shape
    d = max(1, min(pca_dim, n, dims))
    total = float(features.var(axis=0, dtype=np.float64).sum())
    scale = float(np.abs(features).max()) if features.size else 0.0
    if total <= 1e-12 * max(scale, 1.0) ** 2:
        # Every sample has the same features (a dead layer): PCA is undefined, nothing to keep.
        return np.zeros((n, d), dtype=np.float32), 0.0
    pca = PCA(n_components=d, random_state=seed, svd_solver="randomized" if d < min(n, dims) // 2 else "full")
    projected = pca.fit_transform(features)
    return projected.astype(np.float32), float(pca.explained_variance_ratio_.sum())


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a scheduler's share), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_jobs(n_jobs: int | None) -> int:
    """Threads for the embedding: n_jobs <= 0 or None means every available core; more than those
    are not used (they would only take turns)."""
    cores = available_cores()
    return cores if n_jobs is None or n_jobs <= 0 else min(int(n_jobs), cores)


def numba_cache_dir() -> Path | None:
    """The folder numba keeps compiled code in: NUMBA_CACHE_DIR when set; else, in a virtual
    environment, <venv>/var/cache/numba (the code belongs to that environment's packages); else
    $XDG_CACHE_HOME/backdoor_lens/numba (~/.cache by default). None when it cannot be written."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        candidates = [Path(os.environ["NUMBA_CACHE_DIR"]).expanduser()]
    else:
        user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "backdoor_lens" / "numba"
        venv = [Path(sys.prefix) / "var" / "cache" / "numba"] if sys.prefix != sys.base_prefix else []
        candidates = venv + [user]
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK | os.X_OK):
            return folder
    return None


def import_umap():
    """umap-learn, its numba functions compiled once per environment instead of once per process.

    umap-learn declares its functions without numba's on-disk cache (pynndescent, which it imports,
    has it for most of its own): each new process spent about 20 s compiling them on 2 cores before
    the first embedding. While umap is first imported, numba.njit defaults to cache=True, with the
    cache in `numba_cache_dir()`; numba's own checks (source file and its time stamp, numba and
    Python versions) keep a stale entry from being used. A function numba cannot cache is compiled
    as before (numba warns, embed_umap silences it). Without a writable folder nothing changes.
    """
    if "umap" in sys.modules:
        return sys.modules["umap"]
    folder = numba_cache_dir()
    if folder is None:
        import umap
        return umap
    os.environ["NUMBA_CACHE_DIR"] = str(folder)  # for child processes too
    import numba

    numba.config.CACHE_DIR = str(folder)  # numba read its environment when it was first imported
    original = numba.njit

    def njit(*args, **kwargs):
        kwargs.setdefault("cache", True)
        return original(*args, **kwargs)

    numba.njit = njit
    try:
        import umap
    finally:
        numba.njit = original
    return umap


def exact_neighbours(points: np.ndarray, k: int, n_jobs: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(indices, distances), N x k: each point itself first (distance 0), then its k - 1 nearest
    other points by Euclidean distance, nearest first: the neighbour graph umap-learn builds,
    computed exactly. Brute force over n_jobs threads; the answer does not depend on their number."""
    from sklearn.neighbors import NearestNeighbors

    n = len(points)
    own = np.arange(n)[:, None]
    if k <= 1:
        return own.astype(np.int32), np.zeros((n, 1), dtype=np.float32)
    search = NearestNeighbors(n_neighbors=k - 1, algorithm="brute", n_jobs=n_jobs).fit(points)
    # kneighbors() without X leaves each point out of its own list, even among duplicates.
    distances, indices = search.kneighbors()
    indices = np.hstack([own, indices]).astype(np.int32)
    distances = np.hstack([np.zeros((n, 1)), distances]).astype(np.float32)
    return np.ascontiguousarray(indices), np.ascontiguousarray(distances)


def embed_tsne(points: np.ndarray, seed: int = 0, perplexity: float = 30.0, n_jobs: int = 1) -> np.ndarray:
    """openTSNE with PCA initialisation; perplexity capped at (N - 1) / 3, as the method needs.

    Exact neighbours: with Annoy (openTSNE's choice from 1000 points) the result changed with the
    thread count; exact ones give the same embedding on any number of threads (module docstring)."""
    from openTSNE import TSNE, affinity, nearest_neighbors

    n = len(points)
    perplexity = float(min(perplexity, max(1.0, (n - 1) / 3.0)))
    jobs = resolve_jobs(n_jobs)
    data = np.ascontiguousarray(points, dtype=np.float64)
    # Barnes-Hut is faster than the FFT interpolation below ~10k points (openTSNE's own advice).
    method = "bh" if n < 10_000 else "fft"
    tsne = TSNE(n_components=2, perplexity=perplexity, random_state=seed, n_jobs=jobs,
                neighbors="exact", negative_gradient_method=method, initialization="pca" if n > 2 else "random",
                verbose=False)
    # The affinities TSNE.fit would build from neighbors="exact" (MultiscaleMixture over a
    # nearest_neighbors.Sklearn index of k = int(3 x perplexity) neighbours, perplexity capped at
    # (n - 1) / 3 as openTSNE caps it), built here from the index: without an index, openTSNE first
    # imports pynndescent only to learn whether it is installed, and that import compiles
    # pynndescent's numba functions: 15 s the first time in an environment, 2 s in every process after.
    capped = perplexity if 3 * perplexity <= n - 1 else (n - 1) / 3
    index = nearest_neighbors.Sklearn(data, k=min(n - 1, int(3 * capped)), metric="euclidean", n_jobs=jobs,
                                      random_state=seed, verbose=False)
    affinities = affinity.MultiscaleMixture(perplexities=perplexity, knn_index=index, n_jobs=jobs,
                                            random_state=seed, verbose=False)
    return np.asarray(tsne.fit(data, affinities=affinities), dtype=np.float64)


def embed_umap(points: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1,
               n_jobs: int = 1) -> np.ndarray:
    """umap-learn on the exact neighbour graph (n_jobs threads compute it; seeded, umap itself runs
    on one, see the module docstring); n_neighbors capped at N - 1; random initialisation when the
    graph is too small for the spectral one."""
    umap = import_umap()
    n = len(points)
    points = np.ascontiguousarray(points, dtype=np.float32)
    n_neighbors = int(max(2, min(n_neighbors, n - 1)))
    init = "spectral" if n > n_neighbors + 2 else "random"
    # Below 4096 points umap-learn would compute the same exact graph from all pairwise distances;
    # above, its NN-descent is approximate and compiles for a minute in every process (numba
    # cannot cache it).
    indices, distances = exact_neighbours(points, n_neighbors, resolve_jobs(n_jobs))
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed,
                        init=init, n_jobs=1, precomputed_knn=(indices, distances, None))
    with warnings.catch_warnings():
        # No search index for transform() (not used), functions numba cannot cache, small-graph
        # notices: expected.
        warnings.simplefilter("ignore")
        return np.asarray(reducer.fit_transform(points), dtype=np.float64)


def knn_purity(points: np.ndarray, members, k: int = 10) -> tuple[float | None, float | None, int]:
    """(mean k-NN purity of the members, its chance level (M - 1) / (N - 1), the k used).

    None when there are no members or fewer than two points.
    """
    from sklearn.neighbors import NearestNeighbors

    members = np.asarray(members, dtype=bool)
    n, m = len(members), int(members.sum())
    if m == 0 or n < 2:
        return None, None, 0
    k = int(min(k, n - 1))
    # kneighbors() without X leaves each point out of its own neighbour list, even with duplicates.
    neighbours = NearestNeighbors(n_neighbors=k).fit(points).kneighbors(return_distance=False)
    purity = members[neighbours[members]].mean(axis=1)
    return float(purity.mean()), (m - 1) / (n - 1), k


def silhouette(points: np.ndarray, group_a, group_b) -> float | None:
    """Silhouette of two disjoint groups (boolean masks); None when it is undefined (a group empty,
    or fewer than three points in all)."""
    from sklearn.metrics import silhouette_score

    group_a, group_b = np.asarray(group_a, dtype=bool), np.asarray(group_b, dtype=bool)
    both = group_a | group_b
    if not group_a.any() or not group_b.any() or both.sum() < 3:
        return None
    return float(silhouette_score(points[both], group_a[both].astype(int), metric="euclidean"))


def separability(points: np.ndarray, labels, groups, k: int = 10) -> dict:
    """The separation of poisoned (and cross) samples from clean ones in one space (module docstring)."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    poisoned, clean, cross = groups == POISONED, groups == CLEAN, groups == CROSS
    reference = clean & np.isin(labels, np.unique(labels[poisoned]))
    # Without any other sample (bd_test alone) purity is trivially 1 and says nothing.
    purity, chance, k_used = knn_purity(points, poisoned, k) if (~poisoned).any() else (None, None, 0)
    cross_purity, cross_chance, _ = knn_purity(points, cross, k)
    present, counts = np.unique(labels[clean], return_counts=True)
    classes = clean & np.isin(labels, present[counts > 1])  # silhouette needs two members per class
    class_sil = None
    if (counts > 1).sum() >= 2:
        from sklearn.metrics import silhouette_score
        class_sil = float(silhouette_score(points[classes], labels[classes]))
    return {
        "silhouette_poisoned_vs_target_clean": silhouette(points, poisoned, reference),
        "knn_purity_poisoned": purity,
        "knn_purity_chance": chance,
        "knn_k": k_used,
        "knn_purity_cross": cross_purity,
        "knn_purity_cross_chance": cross_chance,
        # How far apart the clean classes lie (silhouette by label): the scale for the numbers above.
        "silhouette_clean_classes": class_sil,
    }


@dataclass
class Embedding:
    coords: np.ndarray  # N x 2
    reduced: np.ndarray  # N x d, the PCA'd features
    explained_variance: float  # share of the feature variance the d PCA axes keep
    groups: np.ndarray  # CLEAN / POISONED / CROSS per sample
    method: str
    metrics: dict = field(default_factory=dict)  # {"embedding": {...}, "features": {...}}


def compute_embedding(features: np.ndarray, labels, original_labels, poison, target: int | None,
                      method: str = "tsne", pca_dim: int = 50, k: int = 10, seed: int = 0, n_jobs: int = 0,
                      perplexity: float = 30.0, n_neighbors: int = 15, min_dist: float = 0.1) -> Embedding:
    """Features -> PCA -> 2-D embedding, with the separability of poisoned samples in both spaces."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = len(features)
    if n < MIN_SAMPLES:
        raise UserError(f"{method} needs at least {MIN_SAMPLES} samples, the split has {n}; raise --n_sub "
                        f"or choose a larger split")
    n_jobs = resolve_jobs(n_jobs)
    groups = sample_groups(labels, original_labels, poison, target)
    reduced, explained = reduce_pca(features, pca_dim, seed)
    if explained == 0.0:
        raise UserError("the layer gives the same output for every sample (a dead layer?); nothing to embed; "
                        "choose another --target_layer_name")
    if method == "tsne":
        coords = embed_tsne(reduced, seed=seed, perplexity=perplexity, n_jobs=n_jobs)
    else:
        coords = embed_umap(reduced, seed=seed, n_neighbors=n_neighbors, min_dist=min_dist, n_jobs=n_jobs)
    if not np.isfinite(coords).all():
        raise UserError(f"{method} gave non-finite coordinates (degenerate features); try another "
                        f"--target_layer_name, --pool avg or more samples")
    metrics = {"embedding": separability(coords, labels, groups, k),
               "features": separability(reduced, labels, groups, k)}
    return Embedding(coords, reduced, explained, groups, method, metrics)
