"""`backdoor-lens all` in one process, sharing passes, writes the numbers each analysis writes alone."""
import contextlib
import io
import json
import shutil

import pytest

from backdoor_lens import runner
from backdoor_lens.analysis import get
from tests.helpers import run_in_process

# The analyses that read shared passes; cm's predictions over bd_train come first in the suite, so
# its pass is the one that answers act and actdist.
SHARING = ["metric", "cm", "tac", "na", "fm", "act", "actdist", "tsne", "fv"]


@pytest.fixture(scope="module")
def both_ways(bb, tmp_path_factory):
    """The same analyses on the miniature record, run by `all` in one process and each alone."""
    root = tmp_path_factory.mktemp("suite")
    record = root / "record"
    shutil.copytree(bb.record_dir, record)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = runner.main([str(record), "--only", ",".join(SHARING), "--no_report",
                            "--dataset_path", str(bb.data_dir)])
    assert code == 0, printed.getvalue()
    alone = root / "alone"
    for name in SHARING:
        argv = ["--result_file_attack", record, "--quiet", "--dataset_path", bb.data_dir,
                "--output_dir", alone] + list(get(name).demo_args)
        code, _, err = run_in_process(name, argv)
        assert code == 0, err
    return record / "visual", alone, printed.getvalue()


@pytest.mark.parametrize("name", SHARING)
def test_every_table_and_summary_equals_the_run_alone(both_ways, name):
    suite, alone, _ = both_ways
    listed = json.loads((suite / name / "run.json").read_text())["files"]
    assert listed == json.loads((alone / name / "run.json").read_text())["files"]
    compared = [f for f in listed if f.endswith((".csv", ".json")) and f != "run.json"]
    assert compared, listed
    for file in compared:
        assert (suite / name / file).read_bytes() == (alone / name / file).read_bytes(), f"{name}/{file} differs"


def test_the_suite_saved_forward_passes(both_ways):
    """tac, na and act's ranking (same split, same batches) read one pass over the poisoned samples
    and their twins; the runner says how many requests were answered without a pass."""
    line = [l for l in both_ways[2].splitlines() if l.startswith("shared forward passes:")]
    assert len(line) == 1
    saved = int(line[0].split(",")[1].split()[0])
    assert saved >= 2, line
