"""Output folders: a run's outputs replace the method folder as a whole, the report shows only the
run's own files, and no exit path (a failure, SIGTERM, SIGKILL) leaves folders behind.

Bad output locations are refused with one line that names the path and what to do.
"""
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from tests.conftest import REPO
from backdoor_lens.args import make_args
from backdoor_lens.errors import UserError

CM = ["--quiet", "--n_sub", "10", "--device", "cpu"]


def cm_args(bb, **values):
    from backdoor_lens.analyses.cm import add_arguments

    return make_args(add_arguments, result_file_attack=str(bb.record_dir), n_sub=10, device="cpu", quiet=True,
                     **values)


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- item 3: the method folder is replaced as a whole; the report shows the run's files only -----

def test_run_replaces_the_method_folder_as_a_whole(bb, tmp_path):
    from backdoor_lens.analyses.cm import ANALYSIS

    out = tmp_path / "out"
    (out / "cm").mkdir(parents=True)
    (out / "cm" / "confusion_matrix_defense.csv").write_text("left by a run with a defense\n")
    (out / "cm" / "landscape_contour.png").write_bytes(b"an older figure")
    ANALYSIS.run(cm_args(bb, output_dir=str(out)))
    files = json.loads((out / "cm" / "run.json").read_text())["files"]
    assert sorted(files) == sorted(p.name for p in (out / "cm").iterdir())  # exactly the run's files
    assert "confusion_matrix_defense.csv" not in files and "confusion_matrix.png" in files
    assert [p.name for p in out.iterdir()] == ["cm"]  # no staging or trash folder beside it
    assert oct((out / "cm").stat().st_mode & 0o777) == oct(0o777 & ~current_umask())  # not a private temp folder


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tiny_png(path, colour):
    Image.new("RGB", (2, 2), colour).save(path)
    return base64.b64encode(path.read_bytes()).decode()


def test_report_embeds_only_the_files_run_json_lists(tmp_path):
    from backdoor_lens.report.build import build_report

    record = tmp_path / "record"
    folder = record / "visual" / "cm"
    folder.mkdir(parents=True)
    listed = tiny_png(folder / "confusion_matrix.png", (255, 0, 0))
    stale = tiny_png(folder / "confusion_matrix_old.png", (0, 0, 255))
    outside = tiny_png(record / "visual" / "secret.png", (0, 255, 0))
    (folder / "run.json").write_text(json.dumps({"files": ["confusion_matrix.png", "../secret.png", "run.json"]}))
    page = build_report(record).read_text()
    assert listed in page
    assert stale not in page and outside not in page


# --- item 4: no leftovers on any exit path --------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from backdoor_lens.output import OutputDir
    out = OutputDir(Path(sys.argv[1]) / "cm")
    out.save_text("half.txt", "half-written")
    print("ready", flush=True)
    time.sleep(600)
""")


def start_holder(out):
    process = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(REPO)), str(out)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_sigkilled_run_leaves_nothing_after_the_next_run(bb, tmp_path, script):
    out = tmp_path / "out"
    killed, alive = start_holder(out), start_holder(out)
    killed.kill()
    killed.wait()
    assert len(hidden(out)) == 2  # the killed run could not clean up; the live one is working
    try:
        result = script("visual_cm.py", "--result_file_attack", bb.record_dir, "--output_dir", out, *CM)
        assert result.returncode == 0, result.stderr
        left = hidden(out)
        assert len(left) == 1 and (out / left[0] / "half.txt").is_file()  # only the live run's staging
        assert str(alive.pid) in left[0]
    finally:
        alive.kill()
        alive.wait()


TERMINATED = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from backdoor_lens.args import make_args
    from backdoor_lens.context import load_context
    args = make_args(result_file_attack=sys.argv[1], output_dir=sys.argv[2], device="cpu", quiet=True)
    with load_context(args, "cm", split=None) as ctx:
        ctx.out.save_text("half.txt", "half-written")
        print("ready", flush=True)
        time.sleep(600)
""")


def test_sigterm_mid_run_removes_everything_the_run_made(bb, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", TERMINATED.format(repo=str(REPO)), str(bb.record_dir), str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    assert any(out.iterdir())  # the staging folder exists while the run works
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode != 0
    assert not out.exists()  # the folder the run created for its outputs went with them


@pytest.mark.parametrize("where", ["output_dir", "record"])
def test_failure_after_writing_leaves_no_folder(tmp_path, monkeypatch, where):
    from tests.bb_fixture import make_bb_root
    from backdoor_lens.context import Context
    from backdoor_lens.analyses.cm import ANALYSIS

    def fails_while_writing(ctx, summary):
        ctx.out.save_text("half.txt", "half-written")
        raise RuntimeError("disk full")

    bb = make_bb_root(tmp_path / "bb", n_train=20, n_test=20)
    before = listing(bb.record_dir)
    monkeypatch.setattr(Context, "finish", fails_while_writing)
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        ANALYSIS.run(cm_args(bb, output_dir=str(out) if where == "output_dir" else None))
    assert not (tmp_path / "new").exists()
    assert listing(bb.record_dir) == before  # not even an empty visual/ in the record


def test_dead_commit_is_rolled_back_to_the_old_folder(tmp_path):
    """Killed between the two renames of a commit: the next run puts the old folder back."""
    from backdoor_lens.output import OutputDir

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"
    trash = tmp_path / f".cm.trash-{host}-{gone.pid}-0a1b2c3d"
    trash.mkdir()
    (trash / "run.json").write_text("{}")
    OutputDir(tmp_path / "cm")
    assert (tmp_path / "cm" / "run.json").read_text() == "{}" and not trash.exists()


# --- item 5: output locations that cannot be written ----------------------------------------------

@pytest.mark.parametrize("case", ["output_dir is a file", "output_dir below a file", "method folder is a file"])
def test_unusable_output_dir_is_one_line(bb, tmp_path, script, case):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = {"output_dir is a file": blocker, "output_dir below a file": blocker / "sub",
           "method folder is a file": tmp_path}[case]
    if case == "method folder is a file":
        (tmp_path / "cm").write_text("a file where the method folder goes")
    result = script("visual_cm.py", "--result_file_attack", bb.record_dir, "--output_dir", out, *CM)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out / "cm") in lines[0] and "--output_dir" in lines[0], result.stderr
    assert "file" in lines[0]
    assert blocker.read_text() == "not a folder"


def deny_writes_to(monkeypatch, folder):
    """Root writes through chmod, so a read-only folder is simulated where the code asks the OS."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        if os.path.abspath(path) == os.path.abspath(folder) and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_output_dir_that_is_not_writable_is_refused(bb, tmp_path, monkeypatch):
    from backdoor_lens.analyses.cm import ANALYSIS

    locked = tmp_path / "locked"
    locked.mkdir()
    deny_writes_to(monkeypatch, locked)
    with pytest.raises(UserError, match=rf"{re.escape(str(locked))} is not writable.*--output_dir"):
        ANALYSIS.run(cm_args(bb, output_dir=str(locked / "out")))
    assert not any(locked.iterdir())


def test_read_only_record_asks_for_output_dir(tmp_path, monkeypatch):
    from tests.bb_fixture import make_bb_root
    from backdoor_lens.analyses.cm import ANALYSIS

    bb = make_bb_root(tmp_path, n_train=20, n_test=20)
    before = listing(bb.record_dir)
    deny_writes_to(monkeypatch, bb.record_dir)
    with pytest.raises(UserError, match=rf"{re.escape(str(bb.record_dir))} is not writable.*pass --output_dir"):
        ANALYSIS.run(cm_args(bb))
    assert listing(bb.record_dir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_for_real(bb, tmp_path, script):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = script("visual_cm.py", "--result_file_attack", bb.record_dir, "--output_dir", locked / "out", *CM)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "not writable" in result.stderr and not any(locked.iterdir())
