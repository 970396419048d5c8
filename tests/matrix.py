"""Run one visual_*.py on one record kind in-process, as its command line would, and classify the outcome.

Used by tests/test_matrix.py and by `python -m tests.matrix` (prints the README's table of which
analysis runs on which record kind).
"""
import contextlib
import importlib
import io
import sys
from pathlib import Path

from utils.script_info import declared_default_split

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in ROOT.glob("visual_*.py"))

# Small settings per script so that the whole matrix stays inside the suite's time.
MATRIX_ARGS = {
    "visual_tsne": ["--n_sub", "24"],
    "visual_umap": ["--n_sub", "24"],
    "visual_na": ["--n_sub", "12"],
    "visual_act": ["--n_sub", "24", "--num_neuron", "2", "--num_image", "2"],
    "visual_actdist": ["--n_sub", "24", "--layers", "layer4.1.conv2,linear"],
    "visual_tac": ["--n_sub", "12", "--layers", "layer3.1.conv2,layer4.1.conv2"],
    "visual_fm": [],
    "visual_cm": ["--n_sub", "24"],
    "visual_metric": ["--n_sub", "24"],
    "visual_gradcam": ["--num_images", "1", "--num_scored", "2"],
    "visual_shap": ["--num_images", "1", "--nsamples", "4", "--background", "4", "--ranked_outputs", "1"],
    "visual_fre": ["--num_images", "1"],
    "visual_saliency": ["--num_images", "1", "--num_scored", "1", "--methods", "saliency,gradcam"],
    "visual_lips": [],
    "visual_hessian": ["--n_sub", "8", "--batch_size", "8", "--hessian_batches", "1", "--hessian_params", "linear",
                       "--top_k", "1", "--max_iter", "5", "--trace_probes", "2", "--lanczos_steps", "3",
                       "--density_probes", "1"],
    "visual_fv": ["--steps", "3", "--n_channels", "2"],
    "visual_network": ["--no_autograd_graph"],
    "visual_quality": ["--n_sub", "8", "--n_examples", "2"],
    "visual_landscape": ["--x=-1:1:2", "--y=-1:1:2", "--n_sub", "8", "--overwrite"],
    "visual_detect": ["--n_sub", "24", "--strip_inputs", "8", "--strip_overlays", "2", "--strip_clean", "4",
                      "--nc_images", "4", "--nc_batch", "4", "--nc_steps", "2", "--nc_classes", "3"],
}


def run_cell(script: str, flags: list, out: Path, extra: list | None = None) -> tuple:
    """Returns (status, message): status 'ok' (outputs written) or 'refused' (exit 2, one line).

    Anything else (a traceback, another exit code, a refusal of more than one line) raises.
    """
    from utils.cli import main

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module = importlib.import_module(script)
    argv = list(flags) + MATRIX_ARGS.get(script, []) + list(extra or []) + ["--output_dir", str(out), "--quiet",
                                                                               "--device", "cpu"]
    stderr = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(module.run, module.add_arguments, default_split=declared_default_split(ROOT / f"{script}.py"), argv=argv)
        except SystemExit as stop:
            code = stop.code
    lines = [line for line in stderr.getvalue().splitlines() if line.strip() and "Warning" not in line
             and not line.startswith(" ")]
    if code == 0:
        written = [p for p in Path(out).rglob("*") if p.is_file()]
        if not written:
            raise AssertionError(f"{script} exited 0 but wrote nothing")
        return "ok", ""
    if code == 2 and len(lines) == 1:
        return "refused", lines[0].split("error: ", 1)[-1]
    raise AssertionError(f"{script} exited {code} with stderr:\n{stderr.getvalue()}")


def main():
    import tempfile

    from tests.bb_fixture import RECORD_KINDS, make_record_kind

    with tempfile.TemporaryDirectory() as tmp:
        kinds = {kind: make_record_kind(Path(tmp) / kind, kind) for kind in RECORD_KINDS}
        print("| script | " + " | ".join(RECORD_KINDS) + " |")
        print("|---" * (len(RECORD_KINDS) + 1) + "|")
        for script in SCRIPTS:
            cells = []
            for kind in RECORD_KINDS:
                try:
                    status, message = run_cell(script, kinds[kind], Path(tmp) / "out" / script / kind)
                    cells.append("runs" if status == "ok" else "needs " + message.split("needs ", 1)[-1][:60]
                                 if "needs" in message else "refused")
                except AssertionError as error:
                    cells.append("FAILS: " + str(error).splitlines()[0][:60])
            print(f"| `{script}.py` | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
