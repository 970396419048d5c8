"""Where results go, written so that a failed run leaves nothing half-written behind.

A run writes its files into a hidden staging folder beside its method folder, made when the first
file is written: a run that fails before that creates nothing at all. When the analysis finished,
`commit()` puts the staged folder in the method folder's place as a whole (the old folder is
renamed to a hidden trash name, the staged one renamed into place, the trash removed), so files
of earlier runs (a defense's table beside a run without a defense, 2-D figures beside a new 1-D
curve) never survive beside new ones. A file that must outlive runs (the landscape's resumable
store, written while the run goes on) is declared with `keep()` and carried into the new folder.

Staging and trash folders carry their owner in their names, `.<method>.partial-<host>-<pid>-<random>`
and `.<method>.trash-<host>-<pid>-<random>`. A run killed with SIGKILL cannot clean up after
itself, so every run first removes the folders of dead owners on its host, and when a kill fell
between the two renames of a commit (no method folder, a dead trash folder) it puts the old
method folder back. A live owner's folders are never touched.
"""
import errno
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from backdoor_lens.errors import UserError

# Hostnames may hold dots and dashes; the owner tag keeps letters and digits so that it splits cleanly.
HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"


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


# --- folders ---------------------------------------------------------------------------------------

def first_existing(path: Path) -> Path:
    """The path itself or its nearest ancestor that exists (a file counts: "below a file" is an error)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def check_writable_location(target: Path, what: str, hint: str) -> None:
    """Raise UserError unless files can be created at `target` (a path that may not exist yet):
    no file in its way, and the folder it would be created in writable."""
    target = Path(target)
    existing = first_existing(target)
    if existing == target.absolute():
        return
    if not existing.is_dir():
        raise UserError(f"{what} {target} is below {existing}, which is a file, not a folder; {hint}")
    if not writable(existing):
        raise UserError(f"{what} {target} cannot be created: {existing} is not writable (read-only); {hint}")


def check_output_folder(final: Path, hint: str) -> None:
    """Raise UserError unless a run can put its folder at `final`: not a file, nothing below a file,
    and writable where the swap renames (the parent, and the old folder itself when it exists)."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise UserError(f"output folder {final} is a file; {hint}")
    check_writable_location(final, "output folder", hint)
    if final.exists():
        for folder in (final.parent, final):
            if not writable(folder):
                raise UserError(f"output folder {folder} is not writable (read-only); {hint}")


def make_folders(folder: Path) -> list:
    """Create `folder` and its missing parents; returns those created, outermost first."""
    folder = Path(folder).absolute()
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:  # another run made it in the meantime: it is not ours to remove
            continue
        created.append(path)
    return created


def remove_empty(folders: list) -> None:
    """Remove the folders (as returned by make_folders) that are still empty, innermost first."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty (another run's output), or already gone


def _owner_prefix(name: str, kind: str) -> str:
    return f".{name}.{kind}-{HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_dead(final: Path) -> None:
    """Remove staging and trash folders of `final` whose owner on this host is dead; restore the
    method folder from a dead trash folder when a kill fell between the renames of a commit."""
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(partial|trash)-{HOST}-(\d+)-[0-9a-f]+")
    for entry in sorted(parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match.group(2))):
            continue
        if match.group(1) == "trash" and not final.exists():
            os.rename(entry, final)
        else:
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block ends, so that a commit's renames are not torn apart."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)  # instant and safe: kept files are only ever replaced whole
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        shutil.copy2(source, destination)


class OutputDir:
    """A run's output folder. Files are staged and appear, replacing the folder, only on `commit()`.

    hint: what the user can do when the folder cannot be written (said with the refusal).
    """

    def __init__(self, final: Path, pdf: bool = False, hint: str = "pass --output_dir a folder you can write to"):
        self.final = Path(final)
        self.pdf = pdf
        check_output_folder(self.final, hint)
        self.written: list[str] = []
        self.kept: list[str] = []
        self._stage: Path | None = None
        self._created: list[Path] = []  # folders this run made, removed again if it ends without output
        self._committed = False
        sweep_dead(self.final)

    def _staging(self) -> Path:
        if self._stage is None:
            self._created += make_folders(self.final.parent)
            stage = self.final.parent / (_owner_prefix(self.final.name, "partial") + secrets.token_hex(4))
            stage.mkdir()
            self._stage = stage
        return self._stage

    def path(self, name: str) -> Path:
        """A staging path for a file that another library writes itself."""
        target = self._staging() / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name not in self.written:
            self.written.append(name)
        return target

    def keep(self, name: str) -> Path:
        """The path of a file that lives in the method folder itself across runs (a resumable store
        saved while the run goes on); it is carried into the folder that replaces this one."""
        self._created += make_folders((self.final / name).parent)
        if name not in self.kept:
            self.kept.append(name)
        return self.final / name

    @property
    def files(self) -> list:
        """Every file the committed folder will hold, staged and kept."""
        return self.written + [name for name in self.kept if name not in self.written and (self.final / name).is_file()]

    def save_figure(self, fig, name: str, dpi: int = 130, crop: bool = True) -> str:
        """crop=False for a figure laid out with margins of its own: cropping to the contents
        measures the figure with a whole extra draw."""
        import matplotlib.pyplot as plt
        from matplotlib.layout_engine import PlaceHolderLayoutEngine

        bbox = "tight" if crop else None
        if not crop and isinstance(fig.get_layout_engine(), PlaceHolderLayoutEngine):
            # tight_layout() leaves this inert placeholder behind, and savefig draws a figure that has
            # any layout engine once more before the real draw; the layout is already done.
            fig.set_layout_engine(None)
        fig.savefig(self.path(f"{name}.png"), dpi=dpi, bbox_inches=bbox)
        if self.pdf:
            fig.savefig(self.path(f"{name}.pdf"), bbox_inches=bbox)
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
        """Put the staged folder in the method folder's place (kept files carried over)."""
        stage = self._staging()
        os.chmod(stage, 0o777 & ~_umask())  # an ordinary folder, as mkdir would have made it
        for name in self.kept:
            source = self.final / name
            if source.is_file() and not (stage / name).exists():
                (stage / name).parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(source, stage / name)
        trash = None
        with _signals_held():
            if self.final.exists() or self.final.is_symlink():
                trash = self.final.parent / (_owner_prefix(self.final.name, "trash") + secrets.token_hex(4))
                os.rename(self.final, trash)
            try:
                os.rename(stage, self.final)
            except OSError:
                if trash is not None:
                    os.rename(trash, self.final)
                raise
            self._stage, self._committed = None, True
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        """Remove what an unfinished run made: its staging folder, and the folders it created if empty."""
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None
        if not self._committed:
            remove_empty(self._created)
            self._created = []
