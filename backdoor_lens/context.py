"""What every script starts from: the record, the model(s) on the device, the split, the output folder."""
import argparse
import platform
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from backdoor_lens import device as device_util
from backdoor_lens.record.datasets import DatasetInfo, dataset_info, open_clean_dataset
from backdoor_lens.errors import UserError
from backdoor_lens.models.layers import get_layer
from backdoor_lens.models import build_model, default_layer_name, load_weights, model_in_channels
from backdoor_lens.output import OutputDir
from backdoor_lens.record.record import DefenseResult, Record, load_defense, load_record
from backdoor_lens.record.images import Batches, ImageStore
from backdoor_lens.record.splits import (AUTO, POISONED_SPLITS, ImageTransform, Split, build_split, first_available,
                                         new_store, stratified_positions)
from backdoor_lens.stats import passes
from backdoor_lens.stats.passes import mark_weights


@dataclass
class Context:
    args: argparse.Namespace
    method: str
    record: Record
    defense: DefenseResult | None
    device: torch.device
    models: dict  # "attack" and, with a defense, "defense": eval-mode models on the device
    info: DatasetInfo
    transform: ImageTransform
    out: OutputDir
    images: ImageStore | None = None  # every image this context decodes, decoded once
    split: Split | None = None
    started: float = field(default_factory=time.time)
    _class_names: tuple | None = None
    _previous_sigterm: tuple | None = None  # (handler,) while this context handles SIGTERM

    # --- models and layers -------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The model under analysis: the defense model when one is given, else the attack's."""
        return self.models.get("defense", self.models["attack"])

    @property
    def model_label(self) -> str:
        return "defense" if "defense" in self.models else "attack"

    def layer_name(self, model=None) -> str:
        model = model or self.model
        name = self.args.target_layer_name or default_layer_name(self.record.model_name, model)
        get_layer(model, name)
        return name

    # --- data --------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.record.num_classes

    @property
    def target_class(self) -> int | None:
        return self.args.target_class if self.args.target_class is not None else self.record.target_class

    @property
    def class_names(self) -> tuple:
        if self._class_names is None:
            try:
                names = tuple(self.clean_data(train=False).class_names)
            except UserError:
                names = ()
            if len(names) != self.num_classes:
                names = tuple(str(i) for i in range(self.num_classes))
            self._class_names = names
        return self._class_names

    def clean_data(self, train: bool):
        """The clean training or test set (open_clean_dataset reads each once per process)."""
        return open_clean_dataset(self.record.dataset, self.record.dataset_root(self.args.dataset_path), train)

    def get_split(self, name: str, n_sub=None, c_sub=None, seed=None) -> Split:
        needs_train = name in ("clean_train", "bd_train", "subset")
        train = self.clean_data(True) if needs_train else None
        test = None if needs_train else self.clean_data(False)
        return build_split(name, self.record, train, test, self.transform, n_sub=n_sub, c_sub=c_sub,
                           pratio=self.args.pratio, target=self.target_class,
                           seed=self.args.seed if seed is None else seed, store=self.images)

    def split_name(self, requested: str | None = None) -> str:
        """The split to read: `requested` or --visual_dataset; "auto" resolves to the first split of the
        analysis's declared preferences that the record has (the one place a split is chosen)."""
        name = requested or self.args.visual_dataset
        if name != AUTO:
            return name
        from .analysis import registry

        declared = registry().get(self.method)
        return first_available(self.record, declared.splits if declared else ())

    def use_split(self, requested: str | None = None, needs_poison: bool = False) -> Split:
        """Build the analysed split (the declared choice, --n_sub, --c_sub) and keep it for run.json."""
        name = self.split_name(requested)
        if needs_poison and name not in POISONED_SPLITS:
            raise UserError(f"{self.method} needs poisoned samples; split {name} has none; "
                            f"use one of {', '.join(POISONED_SPLITS)}")
        self.split = self.get_split(name, n_sub=self.args.n_sub, c_sub=self.args.c_sub)
        if needs_poison and not self.split.poison.any():
            raise UserError(f"{self.method} needs poisoned samples; split {name} has none after filtering")
        return self.split

    def poisoned_split(self, name: str, what: str) -> Split:
        """The poisoned samples of split `name`, capped at --n_sub (a seeded stratified sample), for
        analyses that compare each poisoned sample with its clean twin; kept for run.json."""
        if name not in POISONED_SPLITS:
            raise UserError(f"{what} needs poisoned samples; split {name} has none; "
                            f"use one of {', '.join(POISONED_SPLITS)}")
        split = self.get_split(name, c_sub=self.args.c_sub)
        if not split.poison.any():
            raise UserError(f"{what} needs poisoned samples; split {name} has none after filtering")
        split = split.only_poisoned()
        if self.args.n_sub is not None:
            split = split.take(stratified_positions(split, self.args.n_sub, np.random.default_rng(self.args.seed)))
        self.split = split
        return split

    def loader(self, split: Split, shuffle: bool = False, batch_size: int | None = None) -> Batches:
        """The split's batches on the device: decoded once, assembled by indexing, normalised there.
        shuffle: a permutation seeded by --seed."""
        return Batches(split, batch_size or self.args.batch_size, self.device, shuffle=shuffle, seed=self.args.seed)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform.denormalize(x)

    def example_input(self) -> torch.Tensor:
        """One all-zero input of the record's size on the device: what analyses of the weights alone
        trace the model with (shapes, the data flow), needing no data."""
        height, width = self.record.img_size[:2]
        return torch.zeros(1, self.transform.channels, height, width, device=self.device)

    # --- finishing ---------------------------------------------------------------------------
    def finish(self, summary: dict) -> dict:
        """Write run.json and move every output into place."""
        record = {
            "method": self.method,
            "record": str(self.record.path),
            "record_kind": self.record.kind,
            "defense": str(self.defense.path) if self.defense else None,
            "model": self.record.model_name,
            "dataset": self.record.dataset,
            "split": self.split.name if self.split is not None else None,
            "samples": len(self.split) if self.split is not None else None,
            "poisoned_samples": int(self.split.poison.sum()) if self.split is not None else None,
            "device": str(self.device),
            "seconds": round(time.time() - self.started, 3),
            "arguments": {k: v for k, v in vars(self.args).items()},
            "versions": versions(),
            "summary": summary,
            "files": self.out.files + ["run.json"],
        }
        self.out.save_json("run", record)
        summary = dict(summary)
        summary["output_dir"] = str(self.out.commit())
        return summary

    def __enter__(self):
        # SIGTERM (kill, mpirun, a scheduler) raises like Ctrl-C, so that leaving the block cleans up.
        try:
            self._previous_sigterm = (signal.signal(signal.SIGTERM, _terminate),)
        except ValueError:  # not the main thread: signals are not ours to handle
            self._previous_sigterm = None
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm[0] or signal.SIG_DFL)
        self.out.discard()
        return False


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: handled as an interrupt (outputs discarded, a landscape store saved)."""


def _terminate(signum, frame):
    raise Terminated


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("torchvision", "matplotlib", "sklearn", "openTSNE", "umap", "shap", "pytorch_grad_cam", "captum",
                 "torchmetrics", "h5py", "mpi4py"):
        module = sys.modules.get(name)
        if module is not None:
            found[name] = getattr(module, "__version__", "?")
    return found


def load_zoo_model(name: str, num_classes: int, state_dict: dict, channels: int, source: str, device) -> torch.nn.Module:
    model = build_model(name, num_classes, model_in_channels(name, state_dict, channels))
    load_weights(model, state_dict, source)
    return model.to(device).eval()


class Session:
    """What one process keeps between the analyses it runs (`backdoor-lens all`): records and defenses
    as loaded and decoded images (clean datasets are kept by open_clean_dataset); the shared
    forward passes live in `stats.passes`. Models are built afresh for each analysis from the kept weights, so that
    nothing one analysis does to its model reaches the next."""

    def __init__(self):
        self.tables: dict = {}
        self.passes = None  # the SharedPasses of stats.passes, while the session is open


_SESSION: Session | None = None


@contextmanager
def shared_session():
    """Run several analyses in this process, reading the record, the data and each pass once."""
    global _SESSION
    previous, _SESSION = _SESSION, Session()
    try:
        with passes.sharing() as shared:
            _SESSION.passes = shared
            yield _SESSION
    finally:
        _SESSION = previous


def remembered(table: str, key, make):
    """make(), or under a shared session the value made before for the same key."""
    if _SESSION is None:
        return make()
    values = _SESSION.tables.setdefault(table, {})
    if key not in values:
        values[key] = make()
    return values[key]


def load_context(args: argparse.Namespace, method: str, split: str | None = "visual_dataset",
                 needs_poison: bool = False) -> Context:
    """Everything a script needs. `split`: the args attribute naming the split, or None for none.

    needs_poison: the analysis cannot work without poisoned samples (refused with one line).
    """
    device_util.set_quiet(getattr(args, "quiet", False))
    device_util.seed_everything(args.seed)
    dev = device_util.pick_device(args.device)
    record_key = (str(Path(args.result_file_attack).expanduser().resolve()), args.trust_record, args.prototype,
                  args.model, args.dataset, args.num_classes)
    record = remembered("records", record_key, lambda: load_record(
        args.result_file_attack, trust=args.trust_record, prototype=args.prototype, model_name=args.model,
        dataset=args.dataset, num_classes=args.num_classes))
    if args.target_class is not None and not 0 <= args.target_class < record.num_classes:
        raise UserError(f"--target_class {args.target_class} is out of range; "
                        f"the record has classes 0..{record.num_classes - 1}")
    if needs_poison and record.bd_train is None and record.bd_test is None:
        raise UserError(f"{method} needs poisoned samples, which this "
                        f"{'clean prototype record' if record.kind == 'prototype' else 'record'} does not have")
    info = dataset_info(record.dataset)
    channels = record.img_size[2]
    models = {"attack": mark_weights(load_zoo_model(record.model_name, record.num_classes, record.state_dict,
                                                    channels, f"record {record.path}", dev), "attack", record_key)}
    defense = None
    if args.result_file_defense:
        defense_key = (str(Path(args.result_file_defense).expanduser().resolve()), args.trust_record)
        defense = remembered("defenses", defense_key,
                             lambda: load_defense(args.result_file_defense, trust=args.trust_record))
        name = args.model or defense.model_name or record.model_name
        classes = defense.num_classes or record.num_classes
        models["defense"] = mark_weights(load_zoo_model(name, classes, defense.state_dict, channels,
                                                        f"defense {defense.path}", dev),
                                         "defense", (defense_key, name, args.model))
    if args.target_layer_name:
        for model in models.values():
            get_layer(model, args.target_layer_name)
    in_channels = model_in_channels(record.model_name, record.state_dict, channels)
    transform = ImageTransform(size=tuple(record.img_size[:2]), channels=in_channels,
                               mean=info.mean, std=info.std)
    if args.output_dir:
        final = Path(args.output_dir).expanduser() / method
        hint = "pass --output_dir a folder you can write to"
    else:
        final = (defense.path if defense else record.path) / "visual" / method
        hint = "pass --output_dir DIR to write the outputs elsewhere"
    # Checked here, before any work; it creates nothing until the run writes its first file.
    out = OutputDir(final, pdf=args.pdf, hint=hint)
    images = remembered("images", (record_key, tuple(transform.size)), lambda: new_store(transform, tuple(record.img_size)))
    ctx = Context(args=args, method=method, record=record, defense=defense, device=dev, models=models, info=info,
                  transform=transform, out=out, images=images)
    if split is not None:
        ctx.use_split(getattr(args, split), needs_poison=needs_poison)
    return ctx
