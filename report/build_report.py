"""One self-contained HTML page over a record's visual/ folder (figures embedded, viewable offline).

    python -m report.build_report record/<name> [--defense record/<name>/defense/<d>]

Reads what the scripts wrote (`<method>/summary.json`, `run.json`, and the PNG figures that run.json
lists as the run's files: nothing else that lies in the folder); with a defense, shows the
attack's and the defense's results side by side.
"""
import argparse
import base64
import html
import json
import os
import sys
import tempfile
from pathlib import Path

# (method folder, title, how to read it)
METHODS = [
    ("metric", "Metrics", "Clean accuracy, attack success rate (ASR) and robust accuracy (RA); a working backdoor has high ACC and ASR."),
    ("cm", "Confusion matrix", "Rows are labels, columns predictions; a backdoor pulls poisoned rows into the target column."),
    ("tsne", "t-SNE of features", "Poisoned samples (crosses) forming their own tight cluster near the target class show how the trigger is encoded."),
    ("umap", "UMAP of features", "As t-SNE, with better global structure: a separate poisoned cluster means the layer separates triggered inputs."),
    ("na", "Neuron activation", "Per-channel mean activation of poisoned inputs vs their clean twins; large differences mark trigger neurons."),
    ("act", "Top-activating images", "The images that excite each neuron most; red titles are poisoned images, so neurons dominated by red respond to the trigger."),
    ("actdist", "Activation distribution", "Class make-up of each channel's top-activating images; a large poisoned share marks a backdoor channel."),
    ("tac", "Trigger activation change", "Mean |activation(poisoned) - activation(clean twin)| per channel; the bright channels carry the trigger."),
    ("fm", "Feature maps", "A layer's feature maps for a clean image and for a poisoned image with its difference; look for maps lighting up at the trigger."),
    ("gradcam", "Grad-CAM", "Where the model looks when it decides; on poisoned images a backdoored model looks at the trigger."),
    ("shap", "SHAP values", "Pixel contributions to the top classes; red pushes towards the class, blue away."),
    ("fre", "Frequency saliency", "Fourier magnitude of the input gradient; triggers with high-frequency content shift energy outwards."),
    ("saliency", "Attribution suite vs trigger", "Each attribution method scored by how much of its mass falls on the known trigger footprint, against blank and random baselines."),
    ("lips", "Channel Lipschitz constants", "Upper bounds of each channel's Lipschitz constant; outliers above mean + u*std are the channels CLP prunes."),
    ("hessian", "Hessian spectrum", "Eigenvalue density of the loss Hessian; a large top eigenvalue means a sharp minimum."),
    ("landscape", "Loss landscape", "Loss around the trained weights along two filter-normalised random directions."),
    ("fv", "Feature visualisation", "Synthetic inputs that maximise chosen channels or the target logit; the trigger pattern often appears."),
    ("network", "Network structure", "The record's model as a graph, with a table of layers, shapes and parameters."),
    ("quality", "Trigger visibility", "PSNR/SSIM and norms between each poisoned image and its clean twin; high PSNR/SSIM means an invisible trigger."),
    ("detect", "Poison detectors vs ground truth", "AC, Spectral Signatures, SPECTRE, Mahalanobis (training set) and STRIP (test inputs) scored against the record's poisoned samples: ROC curves near the top-left corner and separate histograms mean the detector finds the poison; Neural Cleanse flags a class whose trigger mask is anomalously small."),
]

# Key numbers at the top of the page, each read from one analysis's summary.json or CSV.
def _metric(folder):
    s = _summary(folder / "metric")
    keys = [k for k in ("clean_accuracy_attack", "asr_attack", "ra_attack", "clean_accuracy_defense", "asr_defense",
                        "ra_defense", "der", "rir") if k in s]
    return [("clean accuracy / ASR / robust accuracy", ", ".join(f"{k} {_fmt(s[k])}" for k in keys))] if keys else []


def _separation(folder):
    rows = []
    for method in ("tsne", "umap"):
        s = _summary(folder / method)
        if "separation_score" in s:
            purity = {k: v for k, v in s.items() if k.startswith("knn_purity_") and "features" not in k}
            rows.append((f"poisoned-cluster separation ({method})",
                         f"silhouette vs target class {_fmt(s['separation_score'])}; "
                         + ", ".join(f"{k} {_fmt(v)}" for k, v in purity.items())))
    return rows


def _channels(entries, value_key):
    return ", ".join(f"{e['layer']}#{e['neuron']} ({_fmt(float(e[value_key]))})" for e in entries[:5])


def _tac(folder):
    s = _summary(folder / "tac")
    return [(f"top TAC channels ({k[len('top_channels_'):]})", _channels(v, "tac"))
            for k, v in s.items() if k.startswith("top_channels_") and v]


def _lips(folder):
    import csv
    rows = []
    for path in sorted((folder / "lips").glob("lips_flagged_*.csv")):
        with open(path) as handle:
            flagged = sorted(csv.DictReader(handle), key=lambda r: -float(r["lips_over_threshold"]))
        model = path.stem[len("lips_flagged_"):]
        rows.append((f"top Lipschitz channels ({model}, x threshold)",
                     f"{len(flagged)} above threshold; " + _channels(flagged, "lips_over_threshold")))
    return rows


def _localisation(folder):
    rows = []
    for method in ("saliency", "gradcam", "shap", "fre"):
        s = _summary(folder / method)
        entries = s.get("localisation") or []
        if entries:
            text = "; ".join(f"{e.get('model', '')} {' '.join(str(e[k]) for k in ('layer', 'method') if e.get(k))}: "
                             f"share {_fmt(e['share'])}, "
                             f"pointing {_fmt(e['pointing'])}" for e in entries[:16])
            rows.append((f"trigger localisation ({method})", text))
    return rows


def _hessian(folder):
    s = _summary(folder / "hessian")
    return [("Hessian top eigenvalue", ", ".join(f"{k[len('top_eigenvalue_'):]} {_fmt(v)}" for k, v in s.items()
                                                 if k.startswith("top_eigenvalue_")))] if s else []


def _quality(folder):
    s = _summary(folder / "quality")
    keys = [k for k in ("psnr_mean", "ssim_mean", "ms_ssim_mean", "l2_mean", "linf_mean") if k in s]
    return [("trigger visibility", ", ".join(f"{k} {_fmt(s[k])}" for k in keys))] if keys else []


def _detect(folder):
    s = _summary(folder / "detect")
    detectors = [k[len("auroc_"):] for k, v in s.items() if k.startswith("auroc_") and v is not None]
    rows = [("poison detectors: AUROC (AP)", ", ".join(f"{d} {_fmt(s[f'auroc_{d}'])} ({_fmt(s.get(f'ap_{d}'))})"
                                                       for d in detectors))] if detectors else []
    if "nc_flagged_class" in s:
        rows.append(("Neural Cleanse", f"flagged class {s['nc_flagged_class']} (target {s.get('target')}), "
                                       f"smallest-mask anomaly index {_fmt(s.get('nc_anomaly_index'))}, "
                                       f"target mask IoU with the trigger {_fmt(s.get('nc_mask_iou'))}"))
    return rows


KEY_NUMBERS = (_metric, _separation, _tac, _lips, _localisation, _hessian, _quality, _detect)


def _summary(folder: Path) -> dict:
    path = folder / "summary.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def _run(folder: Path) -> dict:
    path = folder / "run.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _fmt(value, pattern="{}") -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value[:8]) + (" ..." if len(value) > 8 else "")
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in list(value.items())[:10])
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


def _image_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}" loading="lazy">'


def _figures(folder: Path) -> list:
    """The PNG figures of the run that wrote the folder, in the order it wrote them."""
    files = _run(folder).get("files")
    if not isinstance(files, list):
        return []
    inside = folder.resolve()
    figures = []
    for name in files:
        path = (folder / str(name)).resolve()
        if path.suffix.lower() == ".png" and path.is_relative_to(inside) and path.is_file() and path not in figures:
            figures.append(path)
    return figures


def _column(folder: Path, label: str) -> str:
    if not folder.is_dir():
        return f'<div class="col"><h4>{label}</h4><p class="missing">not run</p></div>'
    parts = [f'<div class="col"><h4>{label}</h4>']
    summary = _summary(folder)
    scalars = {k: v for k, v in summary.items() if not isinstance(v, (dict, list)) and k != "output_dir"}
    if scalars:
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in scalars.items())
        parts.append(f'<table class="nums">{rows}</table>')
    for figure in _figures(folder)[:12]:
        parts.append(f'<figure>{_image_tag(figure)}<figcaption>{html.escape(figure.stem)}</figcaption></figure>')
    run = _run(folder)
    if run:
        parts.append("<details><summary>run arguments and versions</summary><pre>"
                     + html.escape(json.dumps({k: run.get(k) for k in ("arguments", "versions", "device", "seconds",
                                                                           "samples", "split")}, indent=1))
                     + "</pre></details>")
    parts.append("</div>")
    return "".join(parts)


def key_numbers(visual: Path) -> list:
    rows = []
    for extract in KEY_NUMBERS:
        try:
            rows.extend(row for row in extract(visual) if row[1])
        except (KeyError, ValueError, TypeError):
            continue  # a summary from another version of a script: leave its line out
    return rows


CSS = """
body{font-family:sans-serif;margin:1.5em;max-width:1500px;color:#222}
h1{margin-bottom:0}.sub{color:#666;margin-top:.2em}
section{border-top:1px solid #ddd;padding-top:.6em;margin-top:1.2em}
.guide{color:#444;font-style:italic}.row{display:flex;gap:1.5em;flex-wrap:wrap}
.col{flex:1;min-width:420px}figure{display:inline-block;margin:.4em;vertical-align:top}
img{max-width:680px;max-height:560px;border:1px solid #eee}figcaption{font-size:.8em;color:#666}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}
.missing{color:#a00}pre{font-size:.75em;max-height:300px;overflow:auto;background:#f7f7f7}
"""


def build_report(record: Path, defense: str | None = None, out: Path | None = None) -> Path:
    record = Path(record).resolve()
    visual = record / "visual"
    defense_visual = None
    if defense:
        d = Path(defense)
        d = d.parent if d.suffix == ".pt" else d
        defense_visual = d.resolve() / "visual"
    target = Path(out) if out else visual / "report.html"
    columns = [("attack", visual)] + ([("defense", defense_visual)] if defense_visual else [])
    done = [m for m, _, _ in METHODS if any((v / m).is_dir() for _, v in columns)]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Backdoor Lens: {html.escape(record.name)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Backdoor Lens report: {html.escape(record.name)}</h1>",
             f"<p class='sub'>{len(done)} of {len(METHODS)} analyses present · record {html.escape(str(record))}"
             + (f" · defense {html.escape(str(defense_visual.parent))}" if defense_visual else "") + "</p>"]
    for label, folder in columns:
        rows = key_numbers(folder)
        if rows:
            parts.append(f"<h3>Key numbers ({label})</h3><table>"
                         + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
                         + "</table>")
    for method, title, guide in METHODS:
        if method not in done:
            continue
        parts.append(f"<section id='{method}'><h2>{html.escape(title)} <small>({method})</small></h2>"
                     f"<p class='guide'>{html.escape(guide)}</p><div class='row'>")
        for label, folder in columns:
            parts.append(_column(folder / method, ("attack model" if label == "attack" else "with the defense: attack vs defense")
                                  if defense_visual else ""))
        parts.append("</div></section>")
    missing = [m for m, _, _ in METHODS if m not in done]
    if missing:
        parts.append(f"<section><h2>Not run</h2><p>{', '.join(missing)}</p></section>")
    parts.append("</body></html>")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=target.parent)
    with os.fdopen(handle, "w") as stream:
        stream.write("\n".join(parts))
    os.chmod(temporary, 0o644)
    os.replace(temporary, target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("record")
    parser.add_argument("--defense")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not (Path(args.record) / "visual").is_dir():
        print(f"error: {args.record}/visual does not exist; run the analyses first (bash demo.sh {args.record})",
              file=sys.stderr)
        return 2
    print(build_report(Path(args.record), args.defense, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
