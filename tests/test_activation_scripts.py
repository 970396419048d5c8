"""visual_tac, visual_na, visual_act, visual_actdist and visual_fm against direct computations.

The direct side is independent of utils/: the state_dict straight from attack_result.pt, the
clean images from the CIFAR pickles, the poisoned ones from the record's PNGs, normalised by
hand, forwarded as plain batches with our own forward hooks.
"""
import csv
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import visual_act
import visual_actdist
import visual_fm
import visual_na
import visual_tac
from tests.bb_fixture import load_raw, make_bb_root, pruned_state_dict, write_defense
from utils.activations import (AUTO, class_makeup, compute_paired_activations, compute_top_activations,
                               neuron_order, sample_groups, topk_size)
from utils.args import make_args
from utils.errors import UserError
from utils.models import PreActResNet18

MEAN = np.array([0.4914, 0.4822, 0.4465])
STD = np.array([0.247, 0.243, 0.261])
LAST = "layer4.1.conv2"


# --- the direct side ---------------------------------------------------------------------------

def hand_model(bb):
    raw = load_raw(bb.record_dir / "attack_result.pt")
    model = PreActResNet18(10)
    model.load_state_dict(raw["model"])
    return model.eval()


def cifar(bb, train: bool):
    images, labels = [], []
    names = [f"data_batch_{k}" for k in range(1, 6)] if train else ["test_batch"]
    for name in names:
        with open(bb.data_dir / "cifar-10-batches-py" / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(batch[b"labels"])
    return np.concatenate(images), np.array(labels)


def png(bb, which: str, label: int, index: int) -> np.ndarray:
    return np.asarray(Image.open(bb.record_dir / f"{which}_dataset" / str(label) / f"{index}.png").convert("RGB"))


DIRECT_LAYERS = ("conv1", "layer1.0.conv1", "layer2.0.bn1", LAST, "linear")


def outputs(model, images: np.ndarray, layers) -> dict:
    """{layer: N x C x P} for uint8 images N x H x W x 3, via our own hooks."""
    got = {}
    handles = [dict(model.named_modules())[name].register_forward_hook(
        lambda m, i, o, name=name: got.__setitem__(name, o.detach().clone())) for name in layers]
    x = torch.tensor(((images / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return {name: got[name].reshape(got[name].shape[0], got[name].shape[1], -1).double().numpy() for name in layers}


_CACHE = {}


def direct_pairs(bb, which="bd_train") -> dict:
    """Per layer of DIRECT_LAYERS: (poisoned N x C x P, clean twins N x C x P) over the record's poisoned samples."""
    key = (str(bb.record_dir), "pairs", which)
    if key not in _CACHE:
        model = hand_model(bb)
        images, labels = cifar(bb, train=which == "bd_train")
        poisoned = bb.train_poison if which == "bd_train" else bb.test_poison
        p = outputs(model, np.stack([png(bb, which, labels[i], i) for i in poisoned]), DIRECT_LAYERS)
        c = outputs(model, images[poisoned], DIRECT_LAYERS)
        _CACHE[key] = {name: (p[name], c[name]) for name in DIRECT_LAYERS}
    return _CACHE[key]


def direct_tac(pair) -> np.ndarray:
    poisoned, clean = pair
    return np.abs(poisoned - clean).mean(axis=(0, 2))


def served_train_scores(bb, layer: str) -> tuple:
    """Channel means (N x C) of every bd_train sample as served (PNG for the poisoned)."""
    key = (str(bb.record_dir), "served")
    images, labels = cifar(bb, train=True)
    if key not in _CACHE:
        served_images = np.stack([png(bb, "bd_train", labels[i], i) if i in bb.train_poison else images[i]
                                  for i in range(len(labels))])
        _CACHE[key] = {name: out.mean(2) for name, out in outputs(hand_model(bb), served_images, DIRECT_LAYERS).items()}
    served = labels.copy()
    served[bb.train_poison] = bb.target
    return _CACHE[key][layer], labels, served


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def args_for(module, bb, out, **values):
    return make_args(module.add_arguments, default_split=AUTO, result_file_attack=str(bb.record_dir),
                     output_dir=str(out), quiet=True, device="cpu", **values)


def close(got, want, rtol=1e-4, scale=None):
    """Equal up to float32 rounding; `scale`: the size of the activations a difference was taken of."""
    want = np.asarray(want, dtype=np.float64)
    scale = float(np.abs(want).max()) if scale is None else float(scale)
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=rtol, atol=1e-5 * max(scale, 1e-12))


# --- TAC -----------------------------------------------------------------------------------------

def test_tac_equals_direct_computation(bb, script, tmp_path):
    layers = ["conv1", "layer2.0.bn1", LAST, "linear"]
    result = script("visual_tac.py", "--result_file_attack", bb.record_dir, "--output_dir", tmp_path,
                    "--layers", ",".join(layers), "--normalize_by_layer", "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr
    rows = read_csv(tmp_path / "tac" / "tac.csv")
    pairs = direct_pairs(bb)
    for name in layers:
        mine = [r for r in rows if r["layer"] == name]
        want = direct_tac(pairs[name])
        assert [int(r["neuron"]) for r in mine] == list(range(len(want)))
        close([float(r["tac"]) for r in mine], want)
        close([float(r["tac_normalized"]) for r in mine], want / want.max())
    run = json.loads((tmp_path / "tac" / "run.json").read_text())
    assert run["split"] == "bd_train" and run["samples"] == len(bb.train_poison)  # the default when bd_train exists
    summary = json.loads((tmp_path / "tac" / "summary.json").read_text())
    best = max(((n, c, v) for n in layers for c, v in enumerate(direct_tac(pairs[n]))), key=lambda t: t[2])
    assert (summary["top_channels_attack"][0]["layer"], summary["top_channels_attack"][0]["neuron"]) == best[:2]
    assert (tmp_path / "tac" / "tac.png").stat().st_size > 0


def test_tac_with_defense_has_both_models(bb, tmp_path):
    state = load_raw(bb.record_dir / "attack_result.pt")["model"]
    defense = write_defense(tmp_path / "defense" / "fp", pruned_state_dict(state))
    args = args_for(visual_tac, bb, tmp_path / "out", layers="linear", result_file_defense=str(defense))
    summary = visual_tac.run(args)
    rows = read_csv(tmp_path / "out" / "tac" / "tac.csv")
    attack = np.array([float(r["tac"]) for r in rows if r["model"] == "attack"])
    pruned = np.array([float(r["tac"]) for r in rows if r["model"] == "defense"])
    close(attack, direct_tac(direct_pairs(bb)["linear"]))
    assert len(pruned) == 10 and not np.allclose(attack, pruned)
    assert summary["top_channels_defense"]


def test_tac_and_na_fall_back_to_bd_test_and_refuse_without_poison(tmp_path):
    blind = make_bb_root(tmp_path / "blind", n_train=20, n_test=20, with_bd_train=False)
    summary = visual_tac.run(args_for(visual_tac, blind, tmp_path / "o1", layers="linear", n_sub=5))
    assert summary["split"] == "bd_test" and summary["pairs"] == 5
    summary = visual_na.run(args_for(visual_na, blind, tmp_path / "o2"))
    assert summary["split"] == "bd_test" and summary["pairs"] == len(blind.test_poison)
    clean = make_bb_root(tmp_path / "clean", n_train=20, n_test=20, with_bd_train=False, with_bd_test=False)
    for module, out in ((visual_tac, "o3"), (visual_na, "o4")):
        with pytest.raises(UserError, match="needs poisoned samples"):
            module.run(args_for(module, clean, tmp_path / out))
        assert not (tmp_path / out).exists() or not any((tmp_path / out).rglob("*.csv"))
    with pytest.raises(UserError, match="split clean_test has none"):
        visual_tac.run(args_for(visual_tac, blind, tmp_path / "o5", visual_dataset="clean_test"))


# --- neuron activation -------------------------------------------------------------------------

def test_na_profiles_equal_direct_means(bb, tmp_path):
    summary = visual_na.run(args_for(visual_na, bb, tmp_path, per_unit=True))
    p, c = direct_pairs(bb)[LAST]
    clean = c.mean(0)  # C x P: the mean over the clean twins
    poisoned = p.mean(0)
    rows = read_csv(tmp_path / "na" / "na_neurons.csv")
    close([float(r["clean_mean"]) for r in rows], clean.mean(1), scale=np.abs(clean).max())
    close([float(r["poisoned_mean"]) for r in rows], poisoned.mean(1), scale=np.abs(poisoned).max())
    close([float(r["difference"]) for r in rows], poisoned.mean(1) - clean.mean(1), scale=np.abs(clean).max())
    units = read_csv(tmp_path / "na" / "na_units.csv")
    width = 4  # layer4 maps of a 32x32 input are 4x4
    got = np.array([float(r["clean_mean"]) for r in units])
    want = np.array([clean[int(r["neuron"]), int(r["row"]) * width + int(r["col"])] for r in units])
    close(got, want, scale=np.abs(clean).max())
    top = summary["top_neurons_attack"][0]["neuron"]
    assert top == int(np.argmax(poisoned.mean(1) - clean.mean(1)))
    assert summary["pairs"] == len(bb.train_poison)
    assert (tmp_path / "na" / "na.png").is_file() and (tmp_path / "na" / "na_units.png").is_file()


def test_clean_twin_leaves_the_split_poisoned(bb, tmp_path):
    """BackdoorBench's NA cleared the poison flags for good; ours reads the twin and leaves the split alone."""
    from utils.activations import poisoned_split
    from utils.context import load_context

    args = args_for(visual_na, bb, tmp_path, visual_dataset="bd_train")
    with load_context(args, "na", split=None, needs_poison=True) as ctx:
        split = poisoned_split(ctx, "bd_train", "test")
        first = split[0][0].clone()
        model = ctx.model
        compute_paired_activations(model, ctx.loader(split), ctx.loader(split.clean_twin()), [LAST], ctx.device)
        assert split.poison.all() and torch.equal(split[0][0], first)
        assert not torch.equal(split.clean_twin()[0][0], first)


# --- top-activating images ---------------------------------------------------------------------

def test_act_top_images_are_the_argmax(bb, tmp_path):
    scores, labels, served = served_train_scores(bb, LAST)
    visual_act.run(args_for(visual_act, bb, tmp_path / "a", visual_dataset="bd_train", num_neuron=3, num_image=4,
                            neuron_order="random", seed=1))
    rows = read_csv(tmp_path / "a" / "act" / "act_top_images.csv")
    neurons = list(dict.fromkeys(int(r["neuron"]) for r in rows))
    assert neurons == np.random.default_rng(1).permutation(512)[:3].tolist()
    for neuron in neurons:
        mine = [r for r in rows if int(r["neuron"]) == neuron]
        want = np.sort(scores[:, neuron])[::-1][:4]
        close([float(r["activation"]) for r in mine], want)
        for r in mine:
            index = int(r["dataset_index"])
            assert float(r["activation"]) == pytest.approx(scores[index, neuron], rel=1e-4)
            assert int(r["poison"]) == (index in bb.train_poison)
            assert int(r["label"]) == served[index] and int(r["original_label"]) == labels[index]
    assert (tmp_path / "a" / "act" / "act_top_images.png").is_file()


def test_act_tac_order_and_single_image_figure(bb, tmp_path):
    visual_act.run(args_for(visual_act, bb, tmp_path, visual_dataset="bd_train", num_neuron=1, num_image=1,
                            neuron_order="tac"))
    rows = read_csv(tmp_path / "act" / "act_top_images.csv")
    assert len(rows) == 1
    assert int(rows[0]["neuron"]) == int(np.argmax(direct_tac(direct_pairs(bb)[LAST])))
    with Image.open(tmp_path / "act" / "act_top_images.png") as figure:
        assert figure.size[0] < 1000 and figure.size[1] < 800  # one image: a small figure, not a wall of axes


def test_act_splits_many_neurons_into_pages(bb, tmp_path):
    summary = visual_act.run(args_for(visual_act, bb, tmp_path, visual_dataset="clean_test", num_neuron=20,
                                      num_image=3))
    assert summary["figures"] == [f"act_top_images_{k}.png" for k in (1, 2, 3)]
    assert summary["poisoned_share_in_top_images"] == 0
    with pytest.raises(UserError, match="needs poisoned samples in the split"):
        visual_act.run(args_for(visual_act, bb, tmp_path / "x", visual_dataset="clean_test", neuron_order="tac"))


# --- activation distribution -------------------------------------------------------------------

def test_actdist_shares_match_a_direct_topk(bb, tmp_path):
    layers = ["layer1.0.conv1", "linear"]
    summary = visual_actdist.run(args_for(visual_actdist, bb, tmp_path, visual_dataset="bd_train",
                                          layers=",".join(layers)))
    k = len(bb.train_poison)
    assert summary["k"] == k
    rows = read_csv(tmp_path / "actdist" / "actdist.csv")
    for name in layers:
        scores, labels, served = served_train_scores(bb, name)
        group = np.where(np.isin(np.arange(len(labels)), bb.train_poison), 10, served)
        mine = [r for r in rows if r["layer"] == name]
        assert len(mine) == scores.shape[1]
        for r in mine:
            shares = np.array([float(v) for key, v in r.items() if key.startswith("share_")])
            assert shares.sum() == pytest.approx(1.0)
            top = np.argsort(-scores[:, int(r["neuron"])], kind="stable")[:k]
            assert shares == pytest.approx(np.bincount(group[top], minlength=11) / k)
    assert (tmp_path / "actdist" / "actdist_overview.png").is_file()


def test_actdist_without_poison_uses_the_per_class_count(bb, tmp_path):
    summary = visual_actdist.run(args_for(visual_actdist, bb, tmp_path, visual_dataset="clean_test", layers="linear"))
    assert summary["k"] == bb.n_test // 10
    rows = read_csv(tmp_path / "actdist" / "actdist.csv")
    assert all(float(r["share_poisoned"]) == 0 for r in rows)
    assert all(sum(float(v) for key, v in r.items() if key.startswith("share_")) == pytest.approx(1) for r in rows)


# --- feature maps --------------------------------------------------------------------------------

def test_fm_maps_and_pair_equal_direct(bb, tmp_path):
    index = bb.test_poison[0]
    summary = visual_fm.run(args_for(visual_fm, bb, tmp_path, visual_dataset="bd_test", index=index, num_maps=3))
    found = bb.test_poison.index(index)
    p, c = (side[found] for side in direct_pairs(bb, which="bd_test")[LAST])
    rows = read_csv(tmp_path / "fm" / "fm_image.csv")
    close([float(r["mean_activation"]) for r in rows], p.mean(1))
    rows = read_csv(tmp_path / "fm" / "fm_poisoned_vs_clean.csv")
    close([float(r["mean_abs_change"]) for r in rows], np.abs(p - c).mean(1))
    assert summary["pair_dataset_index"] == index and summary["poisoned"]
    assert summary["channels_changed_most"][0] == int(np.argmax(np.abs(p - c).mean(1)))
    with pytest.raises(UserError, match="--index 999 is not in split"):
        visual_fm.run(args_for(visual_fm, bb, tmp_path / "x", visual_dataset="bd_test", index=999))
    assert not (tmp_path / "x" / "fm").exists()
    summary = visual_fm.run(args_for(visual_fm, bb, tmp_path / "clean", visual_dataset="clean_test"))
    assert summary["pair"].startswith("left out")


# --- the pure parts ----------------------------------------------------------------------------

class ConvBnInplaceRelu(torch.nn.Module):
    """torchvision's pattern: a ReLU(inplace=True) overwrites the BatchNorm output after its hook."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.relu = torch.nn.ReLU(inplace=True)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def five_tuples(x):
    n = len(x)
    zeros = torch.zeros(n, dtype=torch.long)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, zeros, zeros, zeros, torch.arange(n)),
                                       batch_size=3)


def test_paired_and_topk_statistics_survive_inplace_relu_and_batching():
    torch.manual_seed(0)
    model = ConvBnInplaceRelu().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
    poisoned, clean = torch.randn(10, 3, 6, 6), torch.randn(10, 3, 6, 6)
    with torch.no_grad():
        bn_p = model.bn(model.conv(poisoned)).flatten(2).double()  # pre-ReLU: what the hook must see
        bn_c = model.bn(model.conv(clean)).flatten(2).double()
    paired = compute_paired_activations(model, five_tuples(poisoned), five_tuples(clean), ["bn"], "cpu", per_unit=True)
    close(paired.tac["bn"], (bn_p - bn_c).abs().mean(dim=(0, 2)).numpy())
    close(paired.clean_mean["bn"], bn_c.mean(dim=(0, 2)).numpy())
    close(paired.poisoned_unit_mean["bn"], bn_p.mean(0).reshape(4, 6, 6).numpy())
    assert (bn_p < 0).any()  # the check above would fail if the ReLU had overwritten the output
    top = compute_top_activations(model, five_tuples(poisoned), ["bn", "head"], "cpu", k=4)
    scores = bn_p.mean(2)
    want_values, want_positions = scores.t().topk(4, dim=1)
    close(top.values["bn"], want_values.numpy())
    assert (top.positions["bn"] == want_positions.numpy()).all()
    assert top.values["head"].shape == (2, 4)


def test_groups_makeup_k_and_orders():
    labels = np.array([0, 1, 2, 0, 3, 0])
    original = np.array([0, 1, 2, 1, 3, 0])
    poison = np.array([0, 0, 1, 1, 0, 1], bool)  # #2 label kept (WaNet "cross"), #3 and #5 relabelled/target
    groups, names = sample_groups(labels, original, poison, 4, target=0)
    assert groups.tolist() == [0, 1, 5, 4, 3, 4]
    assert names[4:] == ["poisoned", "poisoned, label kept"]
    shares = class_makeup(np.array([[0, 3, 5], [1, 2, 4]]), groups, len(names))
    assert shares.sum(1) == pytest.approx([1, 1])
    assert shares[0].tolist() == pytest.approx([1 / 3, 0, 0, 0, 2 / 3, 0])
    assert topk_size(labels, poison) == 3 and topk_size(np.array([0, 0, 1, 1, 2, 2, 2]), np.zeros(7, bool)) == 2
    assert neuron_order("random", 6, seed=3).tolist() == np.random.default_rng(3).permutation(6).tolist()
    assert neuron_order("tac", 3, tac=np.array([0.1, 0.5, 0.2])).tolist() == [1, 2, 0]
    assert neuron_order("index", 3).tolist() == [0, 1, 2]
