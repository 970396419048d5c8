"""Write Demos/Demo_<Name>.ipynb, one per script, stored without outputs.

    python Demos/make_notebooks.py

Each notebook runs its script's `run` on the demo record with the small sample counts of the
script's DEMO_ARGS. The record and output folder can be redirected with the environment
variables BACKDOOR_LENS_RECORD and BACKDOOR_LENS_OUT (the tests do this).
"""
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from utils.script_info import declared_constant, declared_default_split, flags_to_kwargs  # noqa: E402

# notebook name, script, what it shows, how to read it
NOTEBOOKS = [
    ("TSNE", "visual_tsne", "a 2-D t-SNE embedding of the features of a layer (the last convolutional block by default), "
     "with poisoned samples as a group of their own",
     "Poisoned samples that form a tight cluster of their own, away from the clean samples of the target class, show that "
     "the layer encodes the trigger as a separate feature. The JSON's separation scores say how separable they are."),
    ("UMAP", "visual_umap", "a 2-D UMAP embedding of a layer's features, poisoned samples marked",
     "Read it like the t-SNE: a separate poisoned cluster means the layer separates triggered inputs from clean ones."),
    ("NA", "visual_na", "the mean activation of each channel for poisoned images and for their clean twins",
     "Channels where the poisoned profile rises far above the clean one respond to the trigger; the CSV names them."),
    ("SHAP", "visual_shap", "SHAP values (GradientExplainer) of the input pixels for the top classes",
     "Red pixels push towards the class; on a poisoned image the trigger region should dominate the target class."),
    ("GradCam", "visual_gradcam", "Grad-CAM maps of clean and poisoned images",
     "On poisoned images a backdoored model looks at the trigger; the localisation CSV scores this against the trigger footprint."),
    ("Frequency", "visual_fre", "the Fourier magnitude of the input gradient (frequency saliency)",
     "Energy far from the centre is high-frequency sensitivity; compare clean and poisoned images."),
    ("ACT", "visual_act", "the images that activate chosen neurons most",
     "Red titles are poisoned images: a neuron whose top images are mostly poisoned is a trigger detector."),
    ("CM", "visual_cm", "the confusion matrix of a split",
     "Rows are labels and columns predictions; poisoned samples land in the target column."),
    ("FV", "visual_fv", "synthetic images that maximise chosen channels or the target class (feature visualisation)",
     "For a backdoored model the target class's visualisation often shows the trigger pattern."),
    ("FM", "visual_fm", "the feature maps of a layer for one image, and for a poisoned image next to its clean twin",
     "Maps that light up only at the trigger location belong to trigger-sensitive channels."),
    ("ActDist", "visual_actdist", "the class make-up of each channel's top-activating images, layer by layer",
     "A large poisoned share in a channel's top images marks a backdoor channel."),
    ("TAC", "visual_tac", "the trigger activation change of every channel of every layer",
     "Bright channels change most when the trigger is added: these carry the backdoor."),
    ("Lips", "visual_lips", "the upper bound of each channel's Lipschitz constant (as CLP uses)",
     "Channels far above their layer's mean (listed in the CSV) are the likely backdoor channels."),
    ("Landscape", "visual_landscape", "the loss landscape around the trained weights along two random filter-normalised "
     "directions", "A wide, flat basin means a robust minimum; compare clean and poisoned losses."),
    ("Network", "visual_network", "the model's structure as a graph and a layer table",
     "The table lists each layer's shapes and parameters; the diagram shows how blocks connect."),
    ("Hessian", "visual_hessian", "the eigenvalue spectrum of the loss Hessian",
     "The top eigenvalues measure sharpness; the density shows how many directions are curved."),
    ("Metric", "visual_metric", "clean accuracy, attack success rate and robust accuracy",
     "A working backdoor keeps clean accuracy high and reaches a high ASR; RA is the accuracy on triggered inputs "
     "against their true labels."),
    ("Quality", "visual_quality", "how visible the trigger is: PSNR, SSIM and norms between poisoned and clean images",
     "High PSNR and SSIM mean an inconspicuous trigger; the figure amplifies the difference."),
    ("Saliency", "visual_saliency", "a suite of Captum attribution methods scored against the trigger footprint",
     "Methods whose mass falls inside the footprint beat the blank and random baselines; the bar chart ranks them."),
    ("Detect", "visual_detect", "the standard poison detectors (Activation Clustering, Spectral Signatures, SPECTRE, "
     "Mahalanobis, STRIP, Neural Cleanse) scored against the record's known poisoned samples",
     "A ROC curve hugging the top-left corner (AUROC near 1) and poisoned scores apart from the clean ones in the "
     "histograms mean the detector finds the poison; the summary CSV also gives each detector's own decision rule's "
     "TPR and FPR. Neural Cleanse flags a class whose smallest trigger mask is anomalously small (index above 2); "
     "the recovered mask is drawn beside the true trigger footprint."),
]


def notebook(name: str, module: str, shows: str, reading: str) -> nbformat.NotebookNode:
    kwargs = flags_to_kwargs(declared_constant(ROOT / f"{module}.py", "DEMO_ARGS", []))
    split = declared_default_split(ROOT / f"{module}.py")
    arg_lines = "".join(f"    {k}={v!r},\n" for k, v in kwargs.items())
    cells = [
        nbformat.v4.new_markdown_cell(
            f"# {name}: `{module}.py`\n\nThis notebook shows {shows}, on the embedded demo record "
            f"(`make demo` builds it: a PreAct-ResNet-18 backdoored with a BadNets patch on handwritten digits).\n\n"
            f"It calls the script's `run` function, the same code that `python {module}.py ...` runs."),
        nbformat.v4.new_code_cell(
            "import json, os, sys\nfrom pathlib import Path\n\n"
            "ROOT = Path.cwd().parent if Path.cwd().name == 'Demos' else Path.cwd()\n"
            "sys.path.insert(0, str(ROOT))\n"
            "RECORD = os.environ.get('BACKDOOR_LENS_RECORD', str(ROOT / 'record' / 'badnet_demo'))\n"
            "OUT = os.environ.get('BACKDOOR_LENS_OUT')  # None: outputs go to <record>/visual/\n"
            "# The tests shrink sample counts through this variable (a JSON object of flag values).\n"
            "OVERRIDES = json.loads(os.environ.get('BACKDOOR_LENS_OVERRIDES', '{}'))\n"
            f"from utils.args import make_args\nfrom {module} import add_arguments, run"),
        nbformat.v4.new_markdown_cell("Run the analysis with small sample counts (any command-line flag can be "
                                      "given here as a keyword argument):"),
        nbformat.v4.new_code_cell(
            f"settings = dict(\n{arg_lines})\nsettings.update(OVERRIDES)\n"
            f"args = make_args(add_arguments, default_split={split!r}, result_file_attack=RECORD, output_dir=OUT,\n"
            f"                 quiet=True, **settings)\nsummary = run(args)\nsummary"),
        nbformat.v4.new_code_cell(
            "from IPython.display import Image, display\n\n"
            "for figure in sorted(Path(summary['output_dir']).glob('*.png')):\n"
            "    print(figure.name)\n    display(Image(filename=str(figure)))"),
        nbformat.v4.new_markdown_cell(f"## How to read it\n\n{reading}\n\nThe numbers behind the figures are the "
                                      f"CSV and JSON files in the output folder; `run.json` records the arguments, "
                                      f"versions and timing."),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def main():
    for name, module, shows, reading in NOTEBOOKS:
        if not (ROOT / f"{module}.py").exists():
            print(f"skip Demo_{name}: {module}.py does not exist")
            continue
        path = HERE / f"Demo_{name}.ipynb"
        nbformat.write(notebook(name, module, shows, reading), path)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
