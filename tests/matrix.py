"""Run one analysis on one record kind in-process, as its command line would, and classify the outcome.

Used by tests/test_matrix.py and by `python -m tests.matrix` (prints the README's table of which
analysis runs on which record kind). The analyses and their quick arguments come from the registry.
"""
from pathlib import Path

from backdoor_lens.analysis import registry
from tests.helpers import run_in_process

ROOT = Path(__file__).resolve().parent.parent


def analyses() -> list:
    return list(registry())


def run_cell(name: str, flags: list, out: Path, extra: list | None = None) -> tuple:
    """Returns (status, message): status 'ok' (outputs written) or 'refused' (exit 2, one line).

    Anything else (a traceback, another exit code, a refusal of more than one line) raises.
    """
    analysis = registry()[name]
    argv = list(flags) + list(analysis.quick_args) + list(extra or []) + ["--output_dir", str(out), "--quiet",
                                                                          "--device", "cpu"]
    code, _, stderr = run_in_process(name, argv)
    lines = [line for line in stderr.splitlines() if line.strip() and "Warning" not in line
             and not line.startswith(" ")]
    if code == 0:
        written = [p for p in Path(out).rglob("*") if p.is_file()]
        if not written:
            raise AssertionError(f"{name} exited 0 but wrote nothing")
        return "ok", ""
    if code == 2 and len(lines) == 1:
        return "refused", lines[0].split("error: ", 1)[-1]
    raise AssertionError(f"{name} exited {code} with stderr:\n{stderr}")


def main():
    import tempfile

    from tests.bb_fixture import RECORD_KINDS, make_record_kind

    with tempfile.TemporaryDirectory() as tmp:
        kinds = {kind: make_record_kind(Path(tmp) / kind, kind) for kind in RECORD_KINDS}
        print("| analysis | " + " | ".join(RECORD_KINDS) + " |")
        print("|---" * (len(RECORD_KINDS) + 1) + "|")
        for name in analyses():
            cells = []
            for kind in RECORD_KINDS:
                try:
                    status, message = run_cell(name, kinds[kind], Path(tmp) / "out" / name / kind)
                    cells.append("runs" if status == "ok" else "needs " + message.split("needs ", 1)[-1][:60]
                                 if "needs" in message else "refused")
                except AssertionError as error:
                    cells.append("FAILS: " + str(error).splitlines()[0][:60])
            print(f"| `{name}` | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
