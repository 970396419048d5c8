"""Running an analysis in-process as its command line would, shared by the test modules."""
import contextlib
import io

from backdoor_lens.analysis import get


def run_in_process(name: str, argv) -> tuple:
    """`backdoor-lens <name> argv` in this process: (exit code, stdout, stderr).

    name: an analysis name ("cm") or its module ("backdoor_lens.analyses.cm")."""
    analysis = get(name.rsplit(".", 1)[-1])
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            analysis.main([str(a) for a in argv])
        except SystemExit as stop:
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def refusal(name: str, argv, out) -> str:
    """The analysis must stop with exit code 2, one line on stderr and nothing written; returns the line."""
    code, _, stderr = run_in_process(name, list(argv) + ["--output_dir", out, "--quiet", "--device", "cpu"])
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, stderr
    assert not out.exists() or not any(out.rglob("*"))
    return lines[0]
