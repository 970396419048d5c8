"""The analyses tac, na, act, actdist and fm against direct computations.

The direct side is independent of backdoor_lens: the state_dict straight from attack_result.pt, the
clean images from the CIFAR pickles, the poisoned ones from the record's PNGs, normalised by
hand, forwarded as plain batches with our own forward hooks.
"""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from backdoor_lens.analyses import act, actdist, fm, na, tac
from backdoor_lens.args import make_args
from backdoor_lens.errors import UserError
from backdoor_lens.record.splits import AUTO
from backdoor_lens.stats.activations import (class_makeup, compare_twins, compute_paired_activations,
                                             compute_top_activations, descending, neuron_order, rank_channels,
                                             sample_groups, topk_size)
from tests.bb_fixture import load_raw, make_bb_root, pruned_state_dict, write_defense
from tests.oracles import LAST, direct_pairs, direct_tac, outputs, png, served_train_scores

def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def args_for(module, bb, out, **values):
    return make_args(module.add_arguments, default_split=AUTO, result_file_attack=str(bb.record_dir),
                     output_dir=str(out), quiet=True, device="cpu", **values)


def run(module, bb, out, **values) -> dict:
    """The analysis of `module` on record `bb`, as from a notebook; its outputs in out/<name>."""
    return module.ANALYSIS.run(args_for(module, bb, out, **values))


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
    summary = run(tac, bb, tmp_path / "out", layers="linear", result_file_defense=str(defense))
    rows = read_csv(tmp_path / "out" / "tac" / "tac.csv")
    attack = np.array([float(r["tac"]) for r in rows if r["model"] == "attack"])
    pruned = np.array([float(r["tac"]) for r in rows if r["model"] == "defense"])
    close(attack, direct_tac(direct_pairs(bb)["linear"]))
    assert len(pruned) == 10 and not np.allclose(attack, pruned)
    assert summary["top_channels_defense"]


@pytest.mark.parametrize("name_length, models", [(10, 1), (10, 2), (70, 1)])
def test_tac_figure_lays_every_text_inside_without_overlaps(name_length, models):
    """tac_figure places its panels in inches from measured label widths instead of tight_layout:
    drawn, every text must lie inside the figure, and the layer names, the colour bar's texts and
    the bar names must not run into the panel beside them (measured by the renderer, after drawing)."""
    from backdoor_lens.plot.activations import tac_figure

    rng = np.random.default_rng(0)
    layers = [f"block{i}.".ljust(name_length, "x") for i in range(30)]
    labels = ["attack", "defense"][:models]
    shown = {label: {name: rng.random(8 + 8 * (i % 3)) for i, name in enumerate(layers)} for label in labels}
    top = {label: [(layers[i], i % 8, 1.0 - i / 20) for i in range(15)] for label in labels}
    fig = tac_figure(layers, shown, top, False, 100, "bd_test", "record")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    drawn = fig.get_tightbbox(renderer)  # matplotlib's extent of everything drawn, in inches
    width, height = fig.get_size_inches()
    assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01 and drawn.x1 <= width + 0.01 and drawn.y1 <= height + 0.01
    heat_axes = [ax for ax in fig.axes if ax.get_title().startswith(tuple(f"{m} model: TAC per" for m in labels))]
    bar_axes = [ax for ax in fig.axes if "largest TAC" in ax.get_title()]
    colour_bars = [ax for ax in fig.axes if ax not in heat_axes + bar_axes]
    assert len(heat_axes) == len(bar_axes) == len(colour_bars) == models
    for heat, bar, colour in zip(heat_axes, bar_axes, colour_bars):
        layer_names = [t.get_window_extent(renderer) for t in heat.get_yticklabels() if t.get_text()]
        assert min(b.x0 for b in layer_names) >= page.x0 - 1
        colour_right = colour.get_tightbbox(renderer).x1  # its ticks and its label
        bar_names = [t.get_window_extent(renderer) for t in bar.get_yticklabels() if t.get_text()]
        assert heat.get_window_extent(renderer).x1 <= colour.get_window_extent(renderer).x0
        assert colour_right < min(b.x0 for b in bar_names), "the bar names run into the colour bar"


def test_tac_and_na_fall_back_to_bd_test_and_refuse_without_poison(tmp_path):
    blind = make_bb_root(tmp_path / "blind", n_train=20, n_test=20, with_bd_train=False)
    summary = run(tac, blind, tmp_path / "o1", layers="linear", n_sub=5)
    assert summary["split"] == "bd_test" and summary["pairs"] == 5
    summary = run(na, blind, tmp_path / "o2")
    assert summary["split"] == "bd_test" and summary["pairs"] == len(blind.test_poison)
    clean = make_bb_root(tmp_path / "clean", n_train=20, n_test=20, with_bd_train=False, with_bd_test=False)
    for module, out in ((tac, "o3"), (na, "o4")):
        with pytest.raises(UserError, match="needs poisoned samples"):
            run(module, clean, tmp_path / out)
        assert not (tmp_path / out).exists() or not any((tmp_path / out).rglob("*.csv"))
    with pytest.raises(UserError, match="split clean_test has none"):
        run(tac, blind, tmp_path / "o5", visual_dataset="clean_test")


# --- neuron activation -------------------------------------------------------------------------

def test_na_profiles_equal_direct_means(bb, tmp_path):
    summary = run(na, bb, tmp_path, per_unit=True)
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
    from backdoor_lens.context import load_context

    args = args_for(na, bb, tmp_path, visual_dataset="bd_train")
    with load_context(args, "na", split=None, needs_poison=True) as ctx:
        split = ctx.poisoned_split("bd_train", "test")
        first = split[0][0].clone()
        model = ctx.model
        compute_paired_activations(model, ctx.loader(split), ctx.loader(split.clean_twin()), [LAST], ctx.device)
        assert split.poison.all() and torch.equal(split[0][0], first)
        assert not torch.equal(split.clean_twin()[0][0], first)


# --- top-activating images ---------------------------------------------------------------------

def test_act_top_images_are_the_argmax(bb, tmp_path):
    scores, labels, served = served_train_scores(bb, LAST)
    run(act, bb, tmp_path / "a", visual_dataset="bd_train", num_neuron=3, num_image=4, neuron_order="random", seed=1)
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
    run(act, bb, tmp_path, visual_dataset="bd_train", num_neuron=1, num_image=1, neuron_order="tac")
    rows = read_csv(tmp_path / "act" / "act_top_images.csv")
    assert len(rows) == 1
    assert int(rows[0]["neuron"]) == int(np.argmax(direct_tac(direct_pairs(bb)[LAST])))
    with Image.open(tmp_path / "act" / "act_top_images.png") as figure:
        assert figure.size[0] < 1000 and figure.size[1] < 800  # one image: a small figure, not a wall of axes


def test_act_splits_many_neurons_into_pages(bb, tmp_path):
    summary = run(act, bb, tmp_path, visual_dataset="clean_test", num_neuron=20, num_image=3)
    assert summary["figures"] == [f"act_top_images_{k}.png" for k in (1, 2, 3)]
    assert summary["poisoned_share_in_top_images"] == 0
    with pytest.raises(UserError, match="needs poisoned samples in the split"):
        run(act, bb, tmp_path / "x", visual_dataset="clean_test", neuron_order="tac")


# --- activation distribution -------------------------------------------------------------------

def test_actdist_shares_match_a_direct_topk(bb, tmp_path):
    layers = ["layer1.0.conv1", "linear"]
    summary = run(actdist, bb, tmp_path, visual_dataset="bd_train", layers=",".join(layers))
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
    summary = run(actdist, bb, tmp_path, visual_dataset="clean_test", layers="linear")
    assert summary["k"] == bb.n_test // 10
    rows = read_csv(tmp_path / "actdist" / "actdist.csv")
    assert all(float(r["share_poisoned"]) == 0 for r in rows)
    assert all(sum(float(v) for key, v in r.items() if key.startswith("share_")) == pytest.approx(1) for r in rows)


# --- feature maps --------------------------------------------------------------------------------

def test_fm_maps_and_pair_equal_direct(bb, tmp_path):
    index = bb.test_poison[0]
    summary = run(fm, bb, tmp_path, visual_dataset="bd_test", index=index, num_maps=3)
    found = bb.test_poison.index(index)
    p, c = (side[found] for side in direct_pairs(bb, which="bd_test")[LAST])
    rows = read_csv(tmp_path / "fm" / "fm_image.csv")
    close([float(r["mean_activation"]) for r in rows], p.mean(1))
    rows = read_csv(tmp_path / "fm" / "fm_poisoned_vs_clean.csv")
    close([float(r["mean_abs_change"]) for r in rows], np.abs(p - c).mean(1))
    assert summary["pair_dataset_index"] == index and summary["poisoned"]
    assert summary["channels_changed_most"][0] == int(np.argmax(np.abs(p - c).mean(1)))
    with pytest.raises(UserError, match="--index 999 is not in split"):
        run(fm, bb, tmp_path / "x", visual_dataset="bd_test", index=999)
    assert not (tmp_path / "x" / "fm").exists()
    summary = run(fm, bb, tmp_path / "clean", visual_dataset="clean_test")
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
    assert neuron_order("index", 3).tolist() == [0, 1, 2]
    assert descending(np.array([0.1, 0.5, 0.2, 0.5])).tolist() == [1, 3, 2, 0]  # ties in index order
    assert descending(np.array([0.1, 0.5, 0.2]), 2).tolist() == [1, 2]


def test_rank_channels_and_twins_match_direct_tac():
    """The TAC ranking (act --neuron_order tac, fv) and the paired pass of tac/na/fm: direct sums."""
    torch.manual_seed(1)
    model = ConvBnInplaceRelu().eval()
    poisoned, clean = torch.randn(7, 3, 6, 6), torch.randn(7, 3, 6, 6)
    with torch.no_grad():
        bn_p = model.bn(model.conv(poisoned)).flatten(2).double()
        bn_c = model.bn(model.conv(clean)).flatten(2).double()
    tac_direct = (bn_p - bn_c).abs().mean(dim=(0, 2)).numpy()
    ranking = rank_channels(model, five_tuples(poisoned), five_tuples(clean), "bn", "cpu")
    close(ranking.values, tac_direct)
    assert ranking.by == "tac" and ranking.channels.tolist() == np.argsort(-tac_direct, kind="stable").tolist()
    difference = (bn_p - bn_c).mean(dim=(0, 2)).numpy()
    by_difference = rank_channels(model, five_tuples(poisoned), five_tuples(clean), "bn", "cpu", by="difference")
    assert by_difference.channels.tolist() == np.argsort(-difference, kind="stable").tolist()

    class Pairs:  # a split of poisoned samples and its clean twin, as compare_twins reads them
        def __init__(self, x):
            self.x = x

        def clean_twin(self):
            return Pairs(clean)

    both = compare_twins({"a": model, "b": model}, Pairs(poisoned), lambda split: five_tuples(split.x), ["bn"], "cpu")
    assert set(both) == {"a", "b"}
    close(both["b"].tac["bn"], tac_direct)
    with pytest.raises(UserError, match="'nope' is not in the model"):
        compare_twins({"a": model}, Pairs(poisoned), lambda split: five_tuples(split.x), ["bn", "nope"], "cpu")
