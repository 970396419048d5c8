"""The network structure of the record's model (its trained weights loaded): diagrams and a layer table.

- A torchview diagram (modules and tensor shapes, nested to `--depth`) and a torchviz graph of
  the autograd operations, rendered with Graphviz's `dot` when it is installed; without it the
  `.gv` sources are written and the command that renders them is printed.
- Always a layer table (CSV and Markdown), gathered with forward hooks on one input: name, type,
  input and output shape (without the batch dimension), the module's own parameters, and the L2
  norm of those parameters per model (attack and defense differ there, the structure does not).
Needs no data (the input is an all-zero image of the record's size). hiddenlayer, which
BackdoorBench used, is broken on current PyTorch and is not needed.
"""
import shutil
from dataclasses import dataclass

import torch

from backdoor_lens.analysis import Analysis
from backdoor_lens.errors import UserError
from backdoor_lens.plot.network import diagram_sources, render


def add_arguments(parser):
    parser.add_argument("--depth", type=int, default=3, help="nesting depth of the torchview diagram")
    parser.add_argument("--no_autograd_graph", action="store_true",
                        help="skip the torchviz autograd graph (large for deep models)")


@dataclass(frozen=True)
class Settings:
    depth: int
    autograd_graph: bool
    pdf: bool  # render the diagrams as PDF too


def settings(args) -> Settings:
    if args.depth < 1:
        raise UserError("--depth must be at least 1")
    return Settings(args.depth, not args.no_autograd_graph, bool(args.pdf))


def _shape(value) -> str:
    if torch.is_tensor(value):
        return "x".join(str(d) for d in value.shape[1:]) or "scalar"
    if isinstance(value, (tuple, list)):
        return "; ".join(_shape(v) for v in value if torch.is_tensor(v) or isinstance(v, (tuple, list)))
    return ""


def compute_layer_table(model: torch.nn.Module, example: torch.Tensor) -> list[dict]:
    """One row per module that is a leaf or owns parameters, in registration order.

    Shapes are those of the module's first call on `example` (empty when it was not called);
    'parameters' counts the module's own parameters only, so the column sums to the model's total.
    """
    seen, handles = {}, []

    def hook(name):
        def record(module, inputs, output):
            entry = seen.setdefault(name, {"input": _shape(inputs), "output": _shape(output), "calls": 0})
            entry["calls"] += 1
        return record

    rows = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own or not list(module.children()):
            rows.append((name or "(model)", module, own))
            handles.append(module.register_forward_hook(hook(name or "(model)")))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    table = []
    for name, module, own in rows:
        entry = seen.get(name, {"input": "", "output": "", "calls": 0})
        table.append({"name": name, "type": type(module).__name__, "input_shape": entry["input"],
                      "output_shape": entry["output"], "parameters": sum(p.numel() for p in own),
                      "trainable": sum(p.numel() for p in own if p.requires_grad), "calls": entry["calls"],
                      "param_norm": float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in own))) if own else 0.0})
    return table


def markdown(table, columns) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    total = sum(r["parameters"] for r in table)
    lines.append(f"| **total** | | | | {total:,} |" + " |" * (len(columns) - 5))
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


@dataclass
class NetworkResult:
    model_name: str
    model_label: str  # whose weights: "defense" when there is one, else "attack"
    settings: Settings
    table: list  # compute_layer_table's rows of the analysed model, with param_norm_<label> of every model
    columns: list


def compute(ctx, settings: Settings) -> NetworkResult:
    example = ctx.example_input()
    tables = {label: compute_layer_table(model, example) for label, model in ctx.models.items()}
    table = tables[ctx.model_label]
    for label, other in tables.items():
        norms = {row["name"]: row["param_norm"] for row in other}
        for row in table:
            row[f"param_norm_{label}"] = norms.get(row["name"], float("nan"))
    columns = ["name", "type", "input_shape", "output_shape", "parameters", "trainable", "calls"] + \
              [f"param_norm_{label}" for label in tables]
    return NetworkResult(ctx.record.model_name, ctx.model_label, settings, table, columns)


def write(result: NetworkResult, ctx) -> dict:
    """The layer table; the diagrams of the analysed model, rendered when Graphviz is installed."""
    s, table, columns = result.settings, result.table, result.columns
    ctx.out.save_csv("network_layers", [[row[c] for c in columns] for row in table], header=columns)
    ctx.out.save_text("network_layers.md", markdown(table, columns))
    total = sum(r["parameters"] for r in table)
    sources = diagram_sources(ctx.model, ctx.example_input(), s.depth, s.autograd_graph)
    dot = shutil.which("dot")
    rendered, failed = [], {}
    for name, source in sources.items():
        ctx.out.save_text(f"{name}.gv", source)
        if dot:
            for fmt in ("png", "pdf") if s.pdf else ("png",):
                error = render(dot, ctx.out.path(f"{name}.gv"), ctx.out.path(f"{name}.{fmt}"), fmt)
                if error:
                    failed[f"{name}.{fmt}"] = error
                else:
                    rendered.append(f"{name}.{fmt}")
    summary = {"model": result.model_name, "model_analysed": result.model_label, "layers": len(table),
               "parameters": total, "trainable_parameters": sum(r["trainable"] for r in table),
               "diagrams": rendered, "graphviz_sources": [f"{n}.gv" for n in sources],
               "dot": dot, "render_errors": failed}
    print(f"{result.model_name} ({result.model_label} weights): {len(table)} layers, {total:,} parameters; "
          f"table in network_layers.csv/.md")
    if not dot:
        print("Graphviz 'dot' is not installed: wrote " + ", ".join(f"{n}.gv" for n in sources) +
              "; render with e.g. `dot -Tpng network_torchview.gv -o network_torchview.png` "
              "after installing Graphviz (apt-get install graphviz, brew install graphviz, conda install graphviz)")
    for name, error in failed.items():
        print(f"could not render {name}: {error}; the .gv source is written")
    return summary


ANALYSIS = Analysis(
    name="network", title="Network structure", order=17,
    guide="The table lists each layer's shapes and parameters; the diagram shows how blocks connect.",
    shows="the model's structure as a graph and a layer table",
    compute=compute, write=write, settings=settings, add_arguments=add_arguments,
    splits=(), demo_args=("--depth", "2"), quick_args=("--no_autograd_graph",))
