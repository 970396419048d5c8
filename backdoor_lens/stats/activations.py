"""Per-channel activation statistics of many layers, from one pass over the data.

A layer's output for one sample is viewed as C x P: C channels (conv and BatchNorm channels,
linear units) over P positions (H*W for feature maps, 1 for vectors). Forward hooks reduce each
output the moment it is produced, so that

- one forward pass serves every layer an analysis needs (hooks on all of them at once);
- memory depends on the number of channels (and on k for top-k), never on the number of samples;
- an in-place operation later in the forward (torchvision's `ReLU(inplace=True)` right after a
  BatchNorm) cannot overwrite an output before it is read.

The statistics (a = activation of channel c at position p, N samples, P positions):

    mean activation        m_c   = 1/(N P) sum_n sum_p a[n, c, p]
    TAC (trigger change)   TAC_c = 1/(N P) sum_n sum_p |a(poisoned_n)[c, p] - a(clean twin_n)[c, p]|
    channel score          s[n, c] = 1/P sum_p a[n, c, p]   (or max_p with reduce="max")
    top-k                  the k samples with the largest s[n, c], per channel
    ranking                the channels by descending TAC_c (or poisoned_c - clean_c): rank_channels

Everything here is computation on models and loaders (or splits, for the pairs of poisoned
samples and clean twins); choosing the split is the context's business.
"""
from dataclasses import dataclass, field

import numpy as np
import torch

from backdoor_lens.device import progress
from backdoor_lens.errors import UserError
from backdoor_lens.models.layers import named_layers, penultimate_layer, resolve_layers
from backdoor_lens.stats import passes
from backdoor_lens.stats.features import FeatureHooks


# --- hooks -----------------------------------------------------------------------------------

def channel_view(output: torch.Tensor) -> torch.Tensor:
    """N x C x H x W (or N x C x L, or N x C) -> N x C x P, as float32."""
    if output.dim() < 2:
        raise UserError(f"a layer output of shape {tuple(output.shape)} has no channel axis")
    return output.reshape(output.shape[0], output.shape[1], -1).float()


class ReducingHooks(FeatureHooks):
    """Forward hooks that reduce each named layer's output as soon as it is produced.

    `reduce(name, output)` returns something small (per-channel sums, a B x C score matrix);
    `reduced[name]` holds it for the last forward call. The full output is never kept.
    """

    def __init__(self, model: torch.nn.Module, names, reduce):
        super().__init__(model, names, reduce=reduce)

    @property
    def reduced(self) -> dict:
        return self.outputs


def channel_scores(output: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """N x C: each channel's activation per sample, averaged (or maximised) over positions."""
    view = channel_view(output)
    if reduce == "max":
        return view.amax(dim=2)
    if reduce != "mean":
        raise ValueError(f"reduce must be 'mean' or 'max', not {reduce!r}")
    return view.mean(dim=2)


# --- poisoned samples and their clean twins ----------------------------------------------------

@dataclass
class PairedActivations:
    """Statistics of poisoned samples and their clean twins, per layer (numpy, float64).

    poisoned_mean / clean_mean: m_c over the poisoned samples / over their clean twins;
    tac: TAC_c; *_unit_mean (with per_unit): the mean of every unit (channel, position),
    shaped like one sample's output.
    """

    count: int
    shapes: dict
    poisoned_mean: dict
    clean_mean: dict
    tac: dict
    poisoned_unit_mean: dict = field(default_factory=dict)
    clean_unit_mean: dict = field(default_factory=dict)

    def difference(self, layer: str) -> np.ndarray:
        """Poisoned minus clean mean activation per channel."""
        return self.poisoned_mean[layer] - self.clean_mean[layer]

    def restricted(self, layers, per_unit: bool) -> "PairedActivations":
        """The statistics of `layers` only (per-unit means only when asked for)."""
        pick = lambda values: {name: values[name] for name in layers}  # noqa: E731
        return PairedActivations(self.count, pick(self.shapes), pick(self.poisoned_mean), pick(self.clean_mean),
                                 pick(self.tac), pick(self.poisoned_unit_mean) if per_unit else {},
                                 pick(self.clean_unit_mean) if per_unit else {})


def compute_paired_activations(model, poisoned_loader, clean_loader, layers, device, per_unit: bool = False,
                               desc: str = "poisoned and clean twins", required=None) -> PairedActivations:
    """One pass over poisoned samples and their clean twins (two loaders in the same order).

    required: the layers that must run in the forward pass (default: all of `layers`); others that
    do not run are left out of the result.

    Each poisoned batch is forwarded together with its clean twin batch (eval mode: samples do
    not interact), and every layer's hook reduces the pair on the spot.
    """
    layers = list(layers)
    sums = {name: {"p": 0.0, "c": 0.0, "d": 0.0, "pu": 0.0, "cu": 0.0} for name in layers}
    shapes: dict = {}
    state = {"half": 0}

    def reduce(name, output):
        half = state["half"]
        view = channel_view(output)
        poisoned, clean = view[:half], view[half:]
        shapes[name] = tuple(output.shape[1:])
        s = sums[name]
        # One read of the whole batch gives both halves' per-sample sums (summing each half over
        # (0, 2) read the output twice); the difference's buffer is reused for its absolute value.
        per_sample = view.sum(dim=2)
        s["p"] = s["p"] + per_sample[:half].sum(dim=0).double()
        s["c"] = s["c"] + per_sample[half:].sum(dim=0).double()
        s["d"] = s["d"] + torch.sub(poisoned, clean).abs_().sum(dim=(0, 2)).double()
        if per_unit:
            s["pu"] = s["pu"] + poisoned.sum(dim=0).double()
            s["cu"] = s["cu"] + clean.sum(dim=0).double()
        return None

    count = 0
    model.eval()
    with ReducingHooks(model, layers, reduce), torch.inference_mode():
        for bp, bc in progress(zip(poisoned_loader, clean_loader), desc, total=_length(poisoned_loader)):
            if not torch.equal(bp[4], bc[4]):
                raise ValueError("the poisoned and clean loaders are not in the same order")
            state["half"] = bp[0].shape[0]
            model(torch.cat([bp[0], bc[0]]).to(device, non_blocking=True))
            count += bp[0].shape[0]
    if count == 0:
        raise UserError("no poisoned samples to compare with their clean twins")
    _check_fired(layers if required is None else required, shapes)
    result = PairedActivations(count=count, shapes=shapes, poisoned_mean={}, clean_mean={}, tac={})
    for name in (n for n in layers if n in shapes):
        s, positions = sums[name], int(np.prod(shapes[name][1:], dtype=np.int64))
        scale = 1.0 / (count * positions)
        result.poisoned_mean[name] = (s["p"] * scale).cpu().numpy()
        result.clean_mean[name] = (s["c"] * scale).cpu().numpy()
        result.tac[name] = (s["d"] * scale).cpu().numpy()
        if per_unit:
            result.poisoned_unit_mean[name] = (s["pu"] / count).cpu().numpy().reshape(shapes[name])
            result.clean_unit_mean[name] = (s["cu"] / count).cpu().numpy().reshape(shapes[name])
    return result


def compare_twins(models: dict, poisoned, make_loader, layers, device, per_unit: bool = False,
                  desc: str = "poisoned and clean twins") -> dict:
    """{model label: PairedActivations}: each model over the poisoned samples of the split
    `poisoned` and their clean twins (`poisoned.clean_twin()`), loaded by `make_loader(split)`.

    The layers are checked against every model before the first pass, so that a name one model
    lacks is refused before any work. One sample gives that sample's own maps (per_unit) and
    TAC_c = 1/P sum_p |a_c,p(poisoned) - a_c,p(clean twin)|.
    """
    layers = list(layers)
    for model in models.values():
        resolve_layers(model, layers)
    poisoned_loader, clean_loader = make_loader(poisoned), make_loader(poisoned.clean_twin())
    return {label: paired_activations(model, poisoned_loader, clean_loader, layers, device, per_unit=per_unit,
                                      desc=desc)
            for label, model in models.items()}


def paired_activations(model, poisoned_loader, clean_loader, layers, device, per_unit: bool = False,
                       desc: str = "poisoned and clean twins") -> PairedActivations:
    """`compute_paired_activations`, answered from a shared pass when one covers it (backdoor-lens all:
    the first request computes every Conv, BatchNorm and Linear layer, per unit, for the others)."""
    layers = list(layers)
    key = passes.pass_key(model, poisoned_loader)
    if key is None:
        return compute_paired_activations(model, poisoned_loader, clean_loader, layers, device, per_unit, desc)
    shared = passes.active()
    kept = shared.find("twins", key, None, layers, extent=int(per_unit))
    if kept is None:
        every = list(dict.fromkeys(named_layers(model) + layers))
        kept = compute_paired_activations(model, poisoned_loader, clean_loader, every, device, True, desc,
                                          required=layers)
        shared.keep("twins", key, None, kept.shapes, 1, kept)
    return kept.restricted(layers, per_unit)


@dataclass
class ChannelRanking:
    """The channels of one layer by descending `values` (TAC_c or poisoned_c - clean_c)."""

    by: str  # "tac" or "difference"
    channels: np.ndarray
    values: np.ndarray  # per channel, in channel order


def rank_channels(model, poisoned_loader, clean_loader, layer: str, device, by: str = "tac") -> ChannelRanking:
    """The channels of `layer` ranked by TAC_c (by="tac") or by poisoned_c - clean_c
    (by="difference"), largest first (ties in channel order), from one paired pass over the
    poisoned samples and their clean twins (two loaders in the same order).

    The TAC ranking of `act --neuron_order tac` and of `fv`; from a context, e.g.

        split = ctx.poisoned_split("bd_train", "the TAC ranking")
        ranking = rank_channels(ctx.model, ctx.loader(split), ctx.loader(split.clean_twin()), layer, ctx.device)
        ranking.channels[:16]   # the 16 channels the trigger changes most
    """
    if by not in TWIN_ORDERS:
        raise ValueError(f"by must be one of {TWIN_ORDERS}, not {by!r}")
    paired = paired_activations(model, poisoned_loader, clean_loader, [layer], device, desc=f"{by} ranking")
    values = paired.tac[layer] if by == "tac" else paired.difference(layer)
    return ChannelRanking(by, descending(values), values)


def _check_fired(layers, seen):
    silent = [name for name in layers if name not in seen]
    if silent:
        raise UserError(f"layer(s) {', '.join(silent)} are not used by the model's forward pass; choose others")


def _length(loader):
    try:
        return len(loader)
    except TypeError:
        return None


# --- top-activating samples --------------------------------------------------------------------

@dataclass
class TopActivations:
    """Per layer: the k largest channel scores (C x k, descending) and the samples' positions
    in the loader's order (C x k); `channels[layer]` is C, `count` the samples seen."""

    k: int
    count: int
    values: dict
    positions: dict

    def channels(self, layer: str) -> int:
        return self.values[layer].shape[0]

    def restricted(self, layers, k: int) -> "TopActivations":
        """The first k of each list (ties are in sample order, so these are the k best), for `layers`."""
        return TopActivations(min(k, self.count), self.count, {n: self.values[n][:, :k] for n in layers},
                              {n: self.positions[n][:, :k] for n in layers})


# The tracker ranks by one int64 key per (channel, sample) instead of a stable sort of (score,
# position): the score's float32 bits mapped to an order-preserving int32 in the high half, the
# complement of the position in the low half. Keys are unique, so `topk` (a partial selection,
# O(n) per row) returns exactly the k best in (score descending, position ascending) order, the
# order a stable descending sort gives. A stable sort of k + B columns per batch cost as much as
# the forward pass itself on a CPU when k is the poisoned count (thousands).
_LOW = (1 << 32) - 1


def _order_keys(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """C x B int64 keys: larger key = larger score, then earlier position."""
    values = values.float() + 0.0  # -0.0 + 0.0 is +0.0: the two zeros tie, as they compare equal
    values = torch.where(values.isnan(), torch.full_like(values, float("nan")), values)  # one NaN
    bits = values.view(torch.int32)
    # Negative floats order backwards by their bits: flipping the 31 low bits fixes that.
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    return (ordered << 32) | (_LOW - positions.to(values.device, torch.int64)).unsqueeze(0)


def _decode_keys(keys: torch.Tensor) -> tuple:
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.view(torch.float32), _LOW - (keys & _LOW)


class TopKTracker:
    """Running top-k over samples for every channel: memory C x 2k at most, whatever the sample count.

    Ties are kept in sample order, so the list is the k best in (score descending, position
    ascending) order: the same whatever k and the batch size, and the first k of a longer list.
    Batches wait in a buffer until it holds k columns, so each selection is amortised over at
    least k new samples.
    """

    def __init__(self, k: int):
        self.k = k
        self._kept = None  # C x k' int64 keys (k' <= k), unordered
        self._waiting = []
        self._waiting_columns = 0
        self._final = None

    def update(self, scores: torch.Tensor, positions: torch.Tensor):
        """scores: B x C; positions: B (the samples' positions, below 2**32)."""
        self._waiting.append(_order_keys(scores.t(), positions))
        self._waiting_columns += scores.shape[0]
        self._final = None
        if self._waiting_columns >= max(self.k, 256):
            self._select()

    def _select(self):
        keys = torch.cat(([self._kept] if self._kept is not None else []) + self._waiting, dim=1)
        self._kept = keys.topk(self.k, dim=1, sorted=False).values if keys.shape[1] > self.k else keys
        self._waiting, self._waiting_columns = [], 0

    def _finish(self):
        if self._final is None:
            if self._waiting:
                self._select()
            if self._kept is None:
                return None
            self._final = _decode_keys(self._kept.sort(dim=1, descending=True).values)
        return self._final

    @property
    def values(self):
        """C x k' float32 scores, descending (None before the first update)."""
        final = self._finish()
        return None if final is None else final[0]

    @property
    def positions(self):
        """C x k' int64 positions of those scores' samples."""
        final = self._finish()
        return None if final is None else final[1]


def compute_top_activations(model, loader, layers, device, k: int, reduce: str = "mean",
                            desc: str = "top activations") -> TopActivations:
    """The k samples of the loader that activate each channel of each layer most (one pass)."""
    if k < 1:
        raise ValueError("k must be at least 1")
    layers = list(layers)
    key = passes.pass_key(model, loader)
    if key is None:
        return _top_activations(model, loader, layers, device, k, reduce, desc)
    kept = passes.active().find("top", key, reduce, layers, extent=k)
    if kept is None:
        kept, _ = split_pass(model, loader, device, layers, k, reduce, desc)
    return kept.restricted(layers, k)


@dataclass
class PassOutputs:
    """What a shared split pass saw besides the top-k lists, batch by batch as the model produced
    it: the logits (on the device, as a separate pass would have them), the input of the last
    Linear layer (the penultimate representation, float32 on the CPU; None without a Linear
    layer) and each batch's labels, original labels, poison flags and indices."""

    penultimate_layer: str | None
    logits: list = field(default_factory=list)
    penultimate: list = field(default_factory=list)
    rest: list = field(default_factory=list)


def split_pass(model, loader, device, layers=(), k: int = 1, reduce: str = "mean", desc: str = "shared pass"):
    """Under `passes.sharing()`: the one pass over a split that answers every analysis asking for
    its top-k lists (act, actdist), its predictions (metric, cm) or its penultimate features and
    predictions (detect), whichever asks first. Computes the top-k lists of every Conv, BatchNorm
    and Linear layer (and `layers`), as deep as the split's poisoned count (actdist's k) or `k`,
    plus PassOutputs; keeps both. Returns (TopActivations, PassOutputs)."""
    key, shared = passes.pass_key(model, loader), passes.active()
    layers = list(layers)
    every = list(dict.fromkeys(named_layers(model) + layers))
    depth = min(max(k, topk_size(loader.split.labels, loader.split.poison)), len(loader.split))
    try:
        last_linear = penultimate_layer(model)
    except UserError:
        last_linear = None
    outputs = PassOutputs(last_linear)
    top = _top_activations(model, loader, every, device, depth, reduce, desc, required=layers, outputs=outputs)
    shared.keep("top", key, reduce, top.values, depth, top)
    shared.keep("outputs", key, None, (), 0, outputs, new_pass=False)
    return top, outputs


def shared_outputs(model, loader, device, desc: str = "shared pass") -> PassOutputs | None:
    """The kept PassOutputs of this pass (computing the split pass when none is kept yet), or None
    when the pass cannot be shared (nothing active, unmarked weights, a shuffled loader)."""
    key = passes.pass_key(model, loader)
    if key is None or len(loader.split) == 0:  # an empty split: the caller's own loop handles it
        return None
    kept = passes.active().find("outputs", key, None, ())
    return kept if kept is not None else split_pass(model, loader, device, desc=desc)[1]


def _top_activations(model, loader, layers, device, k: int, reduce: str, desc: str, required=None,
                     outputs: PassOutputs | None = None) -> TopActivations:
    trackers = {name: TopKTracker(k) for name in layers}
    state = {"positions": None}

    def reduce_fn(name, output):
        trackers[name].update(channel_scores(output, reduce), state["positions"])
        return None

    seen = 0
    model.eval()
    capture = None
    if outputs is not None and outputs.penultimate_layer is not None:
        capture = dict(model.named_modules())[outputs.penultimate_layer].register_forward_pre_hook(
            lambda module, inputs: outputs.penultimate.append(inputs[0].detach().to("cpu", torch.float32, copy=True)))
    try:
        with ReducingHooks(model, layers, reduce_fn), torch.inference_mode():
            for batch in progress(loader, desc):
                size = batch[0].shape[0]
                state["positions"] = torch.arange(seen, seen + size)
                logits = model(batch[0].to(device, non_blocking=True))
                if outputs is not None:
                    outputs.logits.append(logits)
                    outputs.rest.append(tuple(batch[1:]))
                seen += size
    finally:
        if capture is not None:
            capture.remove()
    if seen == 0:
        raise UserError("no samples to rank")
    fired = {n: t for n, t in trackers.items() if t.values is not None}
    _check_fired(layers if required is None else required, fired)
    return TopActivations(k=min(k, seen), count=seen,
                          values={n: t.values.cpu().numpy() for n, t in fired.items()},
                          positions={n: t.positions.cpu().numpy() for n, t in fired.items()})


# --- class make-up of the top-k ------------------------------------------------------------------

def sample_groups(labels, original_labels, poison, num_classes: int, class_names=None, target=None):
    """The group of each sample for a class make-up: its label, or 'poisoned' (an extra class).

    Poisoned samples whose label was kept (WaNet/InputAware "cross"/noise samples: flag 1, label
    unchanged and not the target) form a group of their own when present.
    Returns (groups int array, group names).
    """
    labels, original_labels, poison = np.asarray(labels), np.asarray(original_labels), np.asarray(poison, bool)
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    groups = labels.astype(np.int64).copy()
    kept = poison & (labels == original_labels)
    if target is not None:
        kept &= labels != target
    groups[poison] = num_classes
    names.append("poisoned")
    if kept.any():
        groups[kept] = num_classes + 1
        names.append("poisoned, label kept")
    return groups, names


def topk_size(labels, poison) -> int:
    """k for the class make-up: the number of poisoned samples, else the mean count per class."""
    poison = np.asarray(poison, bool)
    if poison.any():
        return int(poison.sum())
    present = len(np.unique(labels))
    return max(1, int(round(len(labels) / max(present, 1))))


def class_makeup(positions: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """C x G: the share of each group among each channel's top-k samples (rows sum to 1)."""
    positions = np.asarray(positions)
    chosen = groups[positions]  # C x k
    counts = np.zeros((positions.shape[0], num_groups), np.float64)
    np.add.at(counts, (np.repeat(np.arange(positions.shape[0]), positions.shape[1]), chosen.ravel()), 1.0)
    return counts / positions.shape[1]


# --- ordering neurons ---------------------------------------------------------------------------

NEURON_ORDERS = ("index", "tac", "difference", "random")
TWIN_ORDERS = ("tac", "difference")  # the orders measured on poisoned samples and their clean twins


def descending(values, count: int | None = None) -> np.ndarray:
    """Indices by descending value, ties in index order; the first `count` of them (all when None)."""
    return np.argsort(-np.asarray(values), kind="stable")[:count]


def neuron_order(how: str, num_channels: int, seed: int = 0) -> np.ndarray:
    """Channel ids by index, or in a seeded random permutation; the TWIN_ORDERS come from rank_channels."""
    if how == "index":
        return np.arange(num_channels)
    if how == "random":
        return np.random.default_rng(seed).permutation(num_channels)
    raise ValueError(f"order {how!r} is measured on poisoned samples: use rank_channels")
