"""Where results go, written so that a failed run leaves nothing half-written behind.

Every file of a run is first written into a hidden staging folder beside the final one; only
when the analysis finished are the files moved into place (os.replace, atomic per file). A run
that fails removes its staging folder, so the output folder never holds a partial result.
"""
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_json_text(obj) -> str:
    return json.dumps(_jsonable(obj), indent=2, sort_keys=False)


class OutputDir:
    """A run's output folder. Files are staged and appear only on `commit()`."""

    def __init__(self, final: Path, pdf: bool = False):
        self.final = Path(final)
        self.pdf = pdf
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.final.parent))
        self.written: list[str] = []

    def path(self, name: str) -> Path:
        """A staging path for a file that another library writes itself."""
        target = self.stage / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name not in self.written:
            self.written.append(name)
        return target

    def save_figure(self, fig, name: str, dpi: int = 130) -> str:
        import matplotlib.pyplot as plt

        fig.savefig(self.path(f"{name}.png"), dpi=dpi, bbox_inches="tight")
        if self.pdf:
            fig.savefig(self.path(f"{name}.pdf"), bbox_inches="tight")
        plt.close(fig)
        return f"{name}.png"

    def save_csv(self, name: str, rows, header=None) -> str:
        """rows: a pandas DataFrame, or an iterable of sequences with `header`."""
        target = self.path(f"{name}.csv")
        if hasattr(rows, "to_csv"):
            rows.to_csv(target, index=False)
        else:
            import csv

            with open(target, "w", newline="") as handle:
                writer = csv.writer(handle)
                if header is not None:
                    writer.writerow(header)
                writer.writerows(rows)
        return f"{name}.csv"

    def save_json(self, name: str, obj) -> str:
        self.path(f"{name}.json").write_text(to_json_text(obj) + "\n")
        return f"{name}.json"

    def save_text(self, name: str, text: str) -> str:
        self.path(name).write_text(text)
        return name

    def commit(self) -> Path:
        self.final.mkdir(parents=True, exist_ok=True)
        for name in self.written:
            source = self.stage / name
            if source.exists():
                destination = self.final / name
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, destination)
        shutil.rmtree(self.stage, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)
