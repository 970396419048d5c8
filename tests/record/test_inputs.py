"""What users hand us: flags and YAML values, poisoned PNGs in every encoding, records that do not fit
their dataset. Each is either read exactly or refused with one line (exit 2)."""
import dataclasses
import math
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.bb_fixture import load_raw
from backdoor_lens.args import build_parser, parse_args
from backdoor_lens.record.datasets import open_clean_dataset
from backdoor_lens.errors import UserError
from backdoor_lens.record.record import load_record
from backdoor_lens.record.splits import ImageTransform, Split, build_split
from tests.helpers import run_in_process

TRANSFORM = ImageTransform((32, 32), 3, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))


def run_main(script: str, argv: list) -> tuple:
    """An analysis in-process, as its command line: (exit code, stderr lines)."""
    code, _, stderr = run_in_process(script, argv)
    return code, [line for line in stderr.splitlines() if line.strip()]

def assert_one_line_refusal(result, *fragments, out: Path | None = None):
    """A subprocess result: exit 2, one stderr line holding every fragment, no traceback, nothing written."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    if out is not None:
        assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))


# --- flags and YAML (issue 12 items 2, 9, 10) ----------------------------------------------------

def parse(argv, default_split="clean_test"):
    return parse_args(build_parser(default_split=default_split), ["--result_file_attack", "r"] + list(argv))


def yaml_file(tmp_path, text: str) -> str:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return str(path)


class Hostile:
    """Unpickled the unsafe way, this creates the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_yaml_cannot_switch_trust_on(bb, tmp_path, script):
    record = tmp_path / "record" / "hostile"
    record.mkdir(parents=True)
    marker = tmp_path / "CODE_RAN"
    torch.save({"model": Hostile(marker), "model_name": "preactresnet18", "num_classes": 10, "clean_data": "cifar10"},
               record / "attack_result.pt")
    settings = yaml_file(tmp_path, "trust_record: true\n")
    out = tmp_path / "out"
    result = script("visual_cm.py", "--result_file_attack", record, "--dataset_path", bb.data_dir,
                    "--yaml_path", settings, "--output_dir", out, "--quiet", cwd=tmp_path)
    assert_one_line_refusal(result, "trust_record", "command line", out=out)
    assert not marker.exists()


@pytest.mark.parametrize("text, key, expected", [
    ("n_sub: [1, 2]\n", "n_sub", "an integer"),
    ("pratio: [1]\n", "pratio", "a number"),
    ("batch_size: 2.5\n", "batch_size", "an integer"),
    ("result_file_attack: {a: 1}\n", "result_file_attack", "a text"),
    ("quiet: 3\n", "quiet", "true or false"),
    ("n_sub: 0\n", "n_sub", "at least 1"),
    ("seed: -4\n", "seed", "at least 0"),
    ("visual_dataset: nonsense\n", "visual_dataset", "clean_train, bd_train, clean_test, bd_test, mixed, subset"),
])
def test_yaml_value_of_wrong_type_is_one_line(tmp_path, text, key, expected):
    with pytest.raises(UserError) as caught:
        parse(["--yaml_path", yaml_file(tmp_path, text)])
    message = str(caught.value)
    assert key in message and expected in message, message


def test_yaml_values_convert_like_flags_and_flags_win(tmp_path):
    settings = yaml_file(tmp_path, "n_sub: '12'\npratio: 1\nbatch_size: 7\nquiet: true\nmodel: null\n")
    args = parse(["--yaml_path", settings, "--batch_size", "3"])
    assert (args.n_sub, args.pratio, args.batch_size, args.quiet, args.model) == (12, 1.0, 3, True, None)
    assert isinstance(args.n_sub, int) and isinstance(args.pratio, float)


@pytest.mark.parametrize("argv, flag, expected", [
    (["--seed", "-1"], "--seed", "at least 0"),
    (["--seed", str(2 ** 32)], "--seed", "at most"),
    (["--c_sub", "0"], "--c_sub", "at least 1"),
    (["--n_sub", "0"], "--n_sub", "at least 1"),
    (["--num_workers", "-1"], "--num_workers", "at least 0"),
    (["--batch_size", "0"], "--batch_size", "at least 1"),
    (["--num_classes", "0"], "--num_classes", "at least 1"),
    (["--target_class", "-2"], "--target_class", "at least 0"),
    (["--pratio", "1.5"], "--pratio", "between 0 and 1"),
    (["--pratio", "nan"], "--pratio", "between 0 and 1"),
    (["--n_sub", "2.5"], "--n_sub", "an integer"),
])
def test_numeric_flags_out_of_range(argv, flag, expected):
    with pytest.raises(UserError) as caught:
        parse(argv)
    assert flag in str(caught.value) and expected in str(caught.value), str(caught.value)


def test_visual_dataset_names_a_known_split():
    with pytest.raises(UserError, match="unknown --visual_dataset 'nonsense'; choose one of clean_train, bd_train, "
                                        "clean_test, bd_test, mixed, subset"):
        parse(["--visual_dataset", "nonsense"])
    with pytest.raises(UserError, match="unknown --visual_dataset 'auto'"):
        parse(["--visual_dataset", "auto"])  # 'auto' is a word of the scripts that choose for themselves only
    assert parse(["--visual_dataset", "auto"], default_split="auto").visual_dataset == "auto"
    with pytest.raises(UserError, match="unknown --visual_dataset 'everything'"):
        parse(["--visual_dataset", "clean_test,everything"])
    assert parse(["--visual_dataset", "mixed"]).visual_dataset == "mixed"


def test_bad_flags_end_scripts_with_one_line(bb, tmp_path, script):
    out = tmp_path / "out"
    for flags, fragment in ((["--visual_dataset", "nonsense"], "unknown --visual_dataset"),
                            (["--c_sub", "0"], "at least 1"), (["--seed", "-1"], "--seed")):
        result = script("visual_metric.py", "--result_file_attack", bb.record_dir, "--dataset_path", bb.data_dir,
                        "--output_dir", out, "--quiet", *flags, cwd=tmp_path)
        assert_one_line_refusal(result, fragment, out=out)


# --- poisoned PNGs (issue 12 items 9, 10) -------------------------------------------------------

ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _filtered_rows(samples: np.ndarray, bytes_per_sample: int, filters) -> bytes:
    """PNG scanlines of an H x W x K array, row r filtered with filters[r % len(filters)] (PNG spec 9.2)."""
    h, w, k = samples.shape
    raw = samples.astype(">u2" if bytes_per_sample == 2 else "u1").reshape(h, -1).view(np.uint8).astype(np.int64)
    bpp = k * bytes_per_sample
    out, prior = [], np.zeros(raw.shape[1], np.int64)
    for r, line in enumerate(raw):
        left = np.concatenate([np.zeros(bpp, np.int64), line[:-bpp]])
        up_left = np.concatenate([np.zeros(bpp, np.int64), prior[:-bpp]])
        kind = filters[r % len(filters)]
        if kind == 0:
            predictor = 0
        elif kind == 1:
            predictor = left
        elif kind == 2:
            predictor = prior
        elif kind == 3:
            predictor = (left + prior) // 2
        else:
            p = left + prior - up_left
            pa, pb, pc = np.abs(p - left), np.abs(p - prior), np.abs(p - up_left)
            predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prior, up_left))
        out.append(bytes([kind]) + ((line - predictor) % 256).astype(np.uint8).tobytes())
        prior = line
    return b"".join(out)


def write_png(path: Path, samples: np.ndarray, bit_depth: int, colour_type: int, filters=(0,), interlace=False,
              extra_chunks=()) -> Path:
    """A PNG written by hand from the spec (signature, IHDR, IDAT, IEND), independent of PIL and of utils/."""
    samples = samples if samples.ndim == 3 else samples[..., None]
    h, w = samples.shape[:2]
    size = bit_depth // 8
    if interlace:
        scanlines = b"".join(_filtered_rows(samples[y0::dy, x0::dx], size, filters)
                             for x0, y0, dx, dy in ADAM7 if samples[y0::dy, x0::dx].size)
    else:
        scanlines = _filtered_rows(samples, size, filters)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, int(interlace))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + b"".join(chunk(k, b) for k, b in extra_chunks)
                     + chunk(b"IDAT", zlib.compress(scanlines)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bd_test(bb):
    record = load_record(str(bb.record_dir))
    return build_split("bd_test", record, None, open_clean_dataset("cifar10", bb.data_dir, False), TRANSFORM)


def decode(split: Split, path: Path) -> np.ndarray:
    """Serve `path` as the split's first poisoned image (the split is copied, not changed)."""
    one = split.take([0])
    one.paths[0] = path
    return one.image_uint8(0)


RNG = np.random.default_rng(5)
UINT8 = RNG.integers(0, 256, (32, 32, 3)).astype(np.uint8)
UINT16 = RNG.integers(0, 65536, (32, 32, 3)).astype(np.uint16)
FULL16 = np.full((32, 32, 1), 65535, np.uint16)


def test_writer_agrees_with_pil(tmp_path):
    """The hand-written PNGs are real PNGs: PIL reads the high byte of 16-bit colour, and 8-bit exactly."""
    for filters, interlace in (((0, 1, 2, 3, 4), False), ((4, 3), True)):
        path = write_png(tmp_path / "rgb16.png", UINT16, 16, 2, filters, interlace)
        assert np.array_equal(np.asarray(Image.open(path)), (UINT16 >> 8).astype(np.uint8))
        path = write_png(tmp_path / "rgb8.png", UINT8, 8, 2, filters, interlace)
        assert np.array_equal(np.asarray(Image.open(path)), UINT8)


@pytest.mark.parametrize("filters, interlace", [((0,), False), ((1,), False), ((2,), False), ((3,), False),
                                                ((4,), False), ((0, 1, 2, 3, 4), True)])
def test_16_bit_png_decodes_exactly(bd_test, tmp_path, filters, interlace):
    # Written from uint8 by v * 257: back to the same uint8.
    path = write_png(tmp_path / "a.png", UINT8.astype(np.uint16) * 257, 16, 2, filters, interlace)
    assert np.array_equal(decode(bd_test, path), UINT8)
    # Any 16-bit values: v * 255 / 65535 rounded to the nearest integer (no ties: 65535 / 255 = 257 is odd).
    path = write_png(tmp_path / "b.png", UINT16, 16, 2, filters, interlace)
    expected = np.floor(UINT16.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    assert np.array_equal(decode(bd_test, path), expected)


def test_grey_alpha_and_palette_pngs_convert_exactly(bd_test, tmp_path):
    grey = UINT8[..., :1]
    expected_grey = np.repeat(grey, 3, axis=2)
    cases = {
        "grey16": write_png(tmp_path / "g16.png", grey.astype(np.uint16) * 257, 16, 0, (4,)),
        "grey_alpha16": write_png(tmp_path / "ga16.png", np.concatenate([grey.astype(np.uint16) * 257, FULL16], 2),
                                  16, 4, (1, 3)),
        "grey8": write_png(tmp_path / "g8.png", grey, 8, 0, (2,)),
    }
    for name, path in cases.items():
        assert np.array_equal(decode(bd_test, path), expected_grey), name
    rgba16 = np.concatenate([UINT8.astype(np.uint16) * 257, FULL16], 2)
    assert np.array_equal(decode(bd_test, write_png(tmp_path / "rgba16.png", rgba16, 16, 6, (4,))), UINT8)
    rgba8 = np.concatenate([UINT8, np.full((32, 32, 1), 255, np.uint8)], 2)
    assert np.array_equal(decode(bd_test, write_png(tmp_path / "rgba8.png", rgba8, 8, 6, (3,))), UINT8)
    palette = RNG.integers(0, 256, (16, 3)).astype(np.uint8)
    index = RNG.integers(0, 16, (32, 32)).astype(np.uint8)
    path = write_png(tmp_path / "p.png", index, 8, 3, extra_chunks=[(b"PLTE", palette.tobytes())])
    assert np.array_equal(decode(bd_test, path), palette[index])


def test_lossy_conversions_are_refused(bd_test, tmp_path):
    see_through = np.concatenate([UINT8, np.full((32, 32, 1), 255, np.uint8)], 2)
    see_through[3, 4, 3] = 10
    path = write_png(tmp_path / "alpha.png", see_through, 8, 6)
    with pytest.raises(UserError, match=f"{path}.*transparent"):
        decode(bd_test, path)
    alpha16 = np.concatenate([UINT8.astype(np.uint16) * 257, FULL16], 2)
    alpha16[0, 0, 3] = 0
    path = write_png(tmp_path / "alpha16.png", alpha16, 16, 6)
    with pytest.raises(UserError, match=f"{path}.*transparent"):
        decode(bd_test, path)
    palette = np.arange(48, dtype=np.uint8).reshape(16, 3)
    path = write_png(tmp_path / "ptrns.png", np.zeros((32, 32), np.uint8), 8, 3,
                     extra_chunks=[(b"PLTE", palette.tobytes()), (b"tRNS", b"\x00")])
    with pytest.raises(UserError, match=f"{path}.*transparent"):
        decode(bd_test, path)
    # A colour image for a grayscale record: no exact way to one channel.
    grey_record = Split("bd_test", bd_test.clean, [0], [True], [0], [0], [None], TRANSFORM, image_size=(32, 32, 1))
    with pytest.raises(UserError, match=f"{tmp_path / 'colour.png'}.*colour.*1 channel"):
        decode(grey_record, write_png(tmp_path / "colour.png", UINT8, 8, 2))
    grey_rgb = np.repeat(UINT8[..., :1], 3, axis=2)
    assert np.array_equal(decode(grey_record, write_png(tmp_path / "grey_rgb.png", grey_rgb, 8, 2)), UINT8[..., :1])


def test_png_of_another_size_is_refused(bd_test, tmp_path):
    path = write_png(tmp_path / "small.png", UINT8[:30, :28], 8, 2)
    with pytest.raises(UserError, match=f"{path} is 30x28 .* 32x32"):
        decode(bd_test, path)


def test_unreadable_pngs_name_the_file(bd_test, tmp_path):
    whole = write_png(tmp_path / "whole.png", UINT8, 8, 2, (4,)).read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "text.png").write_text("hello")
    broken = bytearray(whole)
    broken[60] ^= 0xFF  # inside the IDAT: its CRC no longer matches
    (tmp_path / "crc.png").write_bytes(bytes(broken))
    (tmp_path / "folder.png").mkdir()
    for name, fragment in (("truncated.png", "is not a readable image"), ("garbage.png", "is not a readable image"),
                           ("text.png", "is not a readable image"), ("crc.png", "is not a readable image"),
                           ("folder.png", "is a folder"), ("missing.png", "is missing")):
        with pytest.raises(UserError, match=f"{tmp_path / name} {fragment}"):
            decode(bd_test, tmp_path / name)


def copy_record(bb, tmp_path: Path) -> Path:
    """A copy of the fixture record whose PNGs can be changed (attack_result.pt linked, not copied)."""
    record = tmp_path / "record" / bb.record_dir.name
    record.mkdir(parents=True)
    (record / "attack_result.pt").symlink_to(bb.record_dir / "attack_result.pt")
    for folder in ("bd_train_dataset", "bd_test_dataset"):
        shutil.copytree(bb.record_dir / folder, record / folder)
    return record


def cifar_test_arrays(bb):
    """The clean test set straight from the pickle, independent of backdoor_lens.record.datasets."""
    with open(bb.data_dir / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    return batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(batch[b"labels"])


def test_psnr_of_16_bit_pngs_matches_numpy(bb, tmp_path):
    """Issue 12.9: 16-bit grayscale PNGs were clipped to white. Each poisoned image is rewritten as a 16-bit
    grey PNG (v * 257); its PSNR must be that of the uint8 grey image, replicated to RGB, against the clean one."""
    record = copy_record(bb, tmp_path)
    clean_images, _ = cifar_test_arrays(bb)
    expected = {}
    for png in (record / "bd_test_dataset").rglob("*.png"):
        grey = np.asarray(Image.open(png))[..., :1]
        write_png(png, grey.astype(np.uint16) * 257, 16, 0, (4,))
        index = int(png.stem)
        mse = np.mean((np.repeat(grey, 3, axis=2) / 255.0 - clean_images[index] / 255.0) ** 2)
        expected[index] = 10 * math.log10(1.0 / mse)
    out = tmp_path / "out"
    code, lines = run_main("backdoor_lens.analyses.quality", ["--result_file_attack", str(record), "--dataset_path", str(bb.data_dir),
                                              "--visual_dataset", "bd_test", "--output_dir", str(out), "--quiet",
                                              "--device", "cpu", "--n_examples", "1"])
    assert code == 0, lines
    import csv
    with open(out / "quality" / "quality_per_image.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(expected)
    for row in rows:
        assert float(row["psnr"]) == pytest.approx(expected[int(row["original_index"])], abs=1e-3)


@pytest.mark.parametrize("damage, fragment", [("corrupt", "not a readable image"), ("folder", "is a folder"),
                                              ("missing", "is missing"), ("resized", "is 16x16")])
def test_broken_png_ends_a_script_with_one_line(bb, tmp_path, script, damage, fragment):
    record = copy_record(bb, tmp_path)
    png = sorted((record / "bd_test_dataset").rglob("*.png"))[0]
    if damage == "corrupt":
        png.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    elif damage == "folder":
        png.unlink()
        png.mkdir()
    elif damage == "missing":
        png.unlink()
    else:
        Image.open(png).resize((16, 16)).save(png)
    out = tmp_path / "out"
    result = script("visual_cm.py", "--result_file_attack", record, "--dataset_path", bb.data_dir, "--visual_dataset",
                    "bd_test", "--output_dir", out, "--quiet", "--device", "cpu", cwd=tmp_path)
    assert_one_line_refusal(result, png.name, fragment, out=out)


# --- the record meets the dataset (issue 12 item 10) --------------------------------------------

@pytest.fixture(scope="module")
def parts(bb):
    return (load_record(str(bb.record_dir)), open_clean_dataset("cifar10", bb.data_dir, True),
            open_clean_dataset("cifar10", bb.data_dir, False))


def test_indicator_of_another_length_is_refused(parts):
    record, train, test = parts
    longer = dataclasses.replace(record.bd_train, indicator=np.zeros(len(train) + 5, bool))
    with pytest.raises(UserError, match=f"poison_indicator has {len(train) + 5} entries .* {len(train)} samples"):
        build_split("bd_train", dataclasses.replace(record, bd_train=longer), train, test, TRANSFORM)
    shorter = dataclasses.replace(record.bd_test, indicator=np.zeros(len(test) - 1, bool))
    with pytest.raises(UserError, match=f"poison_indicator has {len(test) - 1} entries"):
        build_split("mixed", dataclasses.replace(record, bd_test=shorter), train, test, TRANSFORM)


def test_record_indexing_beyond_the_dataset_is_refused(parts):
    record, train, test = parts
    state = record.bd_test
    beyond = dataclasses.replace(state, poison_index=np.append(state.poison_index, len(test) + 3),
                                 bd_label=np.append(state.bd_label, 0),
                                 original_label=np.append(state.original_label, 1),
                                 paths=state.paths + [state.paths[0]],
                                 indicator=np.ones(len(test), bool))
    with pytest.raises(UserError, match=f"sample {len(test) + 3} .* has only {len(test)} samples"):
        build_split("bd_test", dataclasses.replace(record, bd_test=beyond), train, test, TRANSFORM)


def test_labels_out_of_range_are_refused(parts):
    record, train, test = parts
    wild = dataclasses.replace(record.bd_train, bd_label=np.full(len(record.bd_train.bd_label), 12))
    with pytest.raises(UserError, match="attack label 12 .* 0..9"):
        build_split("bd_train", dataclasses.replace(record, bd_train=wild), train, test, TRANSFORM)
    with pytest.raises(UserError, match="clean test set has label 5 .* 0..4"):
        build_split("clean_test", dataclasses.replace(record, num_classes=5), train, test, TRANSFORM)


def test_record_longer_than_dataset_ends_a_script_with_one_line(bb, tmp_path, script):
    record = tmp_path / "record" / "r"
    shutil.copytree(bb.record_dir, record)
    raw = load_raw(record / "attack_result.pt")
    raw["bd_test"]["poison_indicator"] = np.zeros(bb.n_test * 2)
    torch.save(raw, record / "attack_result.pt")
    out = tmp_path / "out"
    result = script("visual_cm.py", "--result_file_attack", record, "--dataset_path", bb.data_dir, "--visual_dataset",
                    "bd_test", "--output_dir", out, "--quiet", cwd=tmp_path)
    assert_one_line_refusal(result, "poison_indicator", str(bb.n_test), out=out)


def test_hostile_pickle_helper_is_a_real_threat(tmp_path):
    """The Hostile object above does run code when unpickled unsafely (so its absence proves something)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Hostile(marker)))
    assert marker.exists()
