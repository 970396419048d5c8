"""The network diagrams: Graphviz sources of the module graph (torchview) and of the autograd graph
(torchviz), and their rendering with Graphviz's `dot`."""
import subprocess

import torch


def torchview_source(model, example, depth: int) -> str:
    """Modules and tensor shapes, nested to `depth`, traced on `example`."""
    from torchview import draw_graph

    graph = draw_graph(model, input_data=example, depth=depth, device=example.device, mode="eval",
                       expand_nested=True, graph_name=type(model).__name__)
    return graph.visual_graph.source


def autograd_source(model, example) -> str:
    """The autograd operations of one forward pass on `example`, parameters named."""
    from torchviz import make_dot

    with torch.enable_grad():
        output = model.eval()(example)
        return make_dot(output, params=dict(model.named_parameters())).source


def diagram_sources(model, example, depth: int, autograd: bool) -> dict:
    """{output name: Graphviz source}; the autograd graph only when asked (large for deep models)."""
    sources = {"network_torchview": torchview_source(model, example, depth)}
    if autograd:
        sources["network_autograd"] = autograd_source(model, example)
    return sources


def render(dot: str, source_path, image_path, fmt: str = "png", timeout: int = 300) -> str | None:
    """dot -T<fmt>; returns an error text when rendering failed."""
    try:
        done = subprocess.run([dot, f"-T{fmt}", str(source_path), "-o", str(image_path)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"dot took longer than {timeout} s"
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["dot failed"])[-1]
