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


def test_compare_defense_runs_the_comparisons_after_the_attack_with_the_numbers_of_separate_runs(bb, tmp_path):
    """`all --compare_defense D`: the attack round, then the `compares` analyses with the defense in
    the same process; the attack model's passes of the first round answer the second, and the
    tables equal those of `--result_file_defense D` run alone."""
    from tests.bb_fixture import clp_state_dict, load_raw, write_defense

    record = tmp_path / "record"
    shutil.copytree(bb.record_dir, record, ignore=shutil.ignore_patterns("visual", "defense"))
    defense = write_defense(record / "defense" / "clp", clp_state_dict(load_raw(record / "attack_result.pt")["model"]))
    names = ["metric", "cm"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = runner.main([str(record), "--only", ",".join(names), "--compare_defense", str(defense),
                            "--no_report", "--dataset_path", str(bb.data_dir)])
    assert code == 0, printed.getvalue()
    headers = [l for l in printed.getvalue().splitlines() if l.startswith("==> ")]
    assert [h.split(":")[0] for h in headers] == ["==> metric", "==> cm", "==> metric (attack vs defense)",
                                                  "==> cm (attack vs defense)"]
    # The attack round made 3 passes of the attack model (clean_test, bd_test, cm's split); in the
    # second round those 3 are answered and only the defense model's 3 are made.
    line = [l for l in printed.getvalue().splitlines() if l.startswith("shared forward passes:")][0]
    assert line.startswith("shared forward passes: 6 computed, 3 more"), line
    alone = tmp_path / "alone"
    for name in names:
        argv = ["--result_file_attack", record, "--result_file_defense", defense, "--quiet", "--dataset_path",
                bb.data_dir, "--output_dir", alone] + list(get(name).demo_args)
        code, _, err = run_in_process(name, argv)
        assert code == 0, err
        together = defense / "visual" / name
        listed = json.loads((together / "run.json").read_text())["files"]
        compared = [f for f in listed if f.endswith((".csv", ".json")) and f != "run.json"]
        assert compared, listed
        for file in compared:
            assert (together / file).read_bytes() == (alone / name / file).read_bytes(), f"{name}/{file} differs"
    assert "der" in (defense / "visual" / "metric" / "metric_summary.csv").read_text().splitlines()[0].split(",")
