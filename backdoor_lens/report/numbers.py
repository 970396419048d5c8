"""Reading an analysis's written numbers back for the report's key-number lines (no computing)."""
import json
from pathlib import Path


def read_summary(folder: Path) -> dict:
    """The summary.json of an analysis's output folder, {} when absent or unreadable."""
    path = Path(folder) / "summary.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def fmt(value, pattern="{}") -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value[:8]) + (" ..." if len(value) > 8 else "")
    if isinstance(value, dict):
        return "; ".join(f"{k}: {fmt(v)}" for k, v in list(value.items())[:10])
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


def listed_numbers(folder: Path, label: str, keys) -> list:
    """One line of the summary's values under `keys` (those present), [] when none is."""
    s = read_summary(folder)
    present = [k for k in keys if k in s]
    return [(label, ", ".join(f"{k} {fmt(s[k])}" for k in present))] if present else []


def channels_text(entries, value_key: str) -> str:
    """'layer#neuron (value)' of the first five entries."""
    return ", ".join(f"{e['layer']}#{e['neuron']} ({fmt(float(e[value_key]))})" for e in entries[:5])


def localisation_numbers(folder: Path) -> list:
    """The trigger-localisation line of an attribution analysis (gradcam, shap, fre, saliency)."""
    entries = read_summary(folder).get("localisation") or []
    if not entries:
        return []
    text = "; ".join(f"{e.get('model', '')} {' '.join(str(e[k]) for k in ('layer', 'method') if e.get(k))}: "
                     f"share {fmt(e['share'])}, pointing {fmt(e['pointing'])}" for e in entries[:16])
    return [(f"trigger localisation ({Path(folder).name})", text)]


def separation_numbers(folder: Path) -> list:
    """The poisoned-cluster separation line of an embedding (tsne, umap)."""
    s = read_summary(folder)
    if "separation_score" not in s:
        return []
    purity = {k: v for k, v in s.items() if k.startswith("knn_purity_") and "features" not in k}
    return [(f"poisoned-cluster separation ({Path(folder).name})",
             f"silhouette vs target class {fmt(s['separation_score'])}; "
             + ", ".join(f"{k} {fmt(v)}" for k, v in purity.items()))]
