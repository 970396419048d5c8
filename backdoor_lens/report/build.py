"""One self-contained HTML page over a record's visual/ folder (figures embedded, viewable offline).

    python -m backdoor_lens.report.build record/<name> [--defense record/<name>/defense/<d>]

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

from backdoor_lens.analysis import registry
from backdoor_lens.report.numbers import fmt, read_summary

def _run(folder: Path) -> dict:
    path = folder / "run.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


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
    summary = read_summary(folder)
    scalars = {k: v for k, v in summary.items() if not isinstance(v, (dict, list)) and k != "output_dir"}
    if scalars:
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(fmt(v))}</td></tr>" for k, v in scalars.items())
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
    """Each analysis's declared key numbers, read from its folder under visual/."""
    rows = []
    for analysis in registry().values():
        if analysis.key_numbers is None or not (visual / analysis.name).is_dir():
            continue
        try:
            rows.extend(row for row in analysis.key_numbers(visual / analysis.name) if row[1])
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
    methods = [(a.name, a.title, a.guide) for a in registry().values()]
    done = [m for m, _, _ in methods if any((v / m).is_dir() for _, v in columns)]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Backdoor Lens: {html.escape(record.name)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Backdoor Lens report: {html.escape(record.name)}</h1>",
             f"<p class='sub'>{len(done)} of {len(methods)} analyses present · record {html.escape(str(record))}"
             + (f" · defense {html.escape(str(defense_visual.parent))}" if defense_visual else "") + "</p>"]
    for label, folder in columns:
        rows = key_numbers(folder)
        if rows:
            parts.append(f"<h3>Key numbers ({label})</h3><table>"
                         + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
                         + "</table>")
    for method, title, guide in methods:
        if method not in done:
            continue
        parts.append(f"<section id='{method}'><h2>{html.escape(title)} <small>({method})</small></h2>"
                     f"<p class='guide'>{html.escape(guide)}</p><div class='row'>")
        for label, folder in columns:
            parts.append(_column(folder / method, ("attack model" if label == "attack" else "with the defense: attack vs defense")
                                  if defense_visual else ""))
        parts.append("</div></section>")
    missing = [m for m, _, _ in methods if m not in done]
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
