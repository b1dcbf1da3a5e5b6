"""``quantize(guard=true)``: time a quantized layer against its float form on
the backend the model will run on, each cut out of the graph as a one-input
model. Backends are looked up by name (:mod:`fxopt.ir.targets`), never
imported."""

from __future__ import annotations

import torch
import torch.fx as fx

from ...ir.targets import target
from ...ir.timing import median_ms
from ...ir.trace import trace
from ..layers import Layer


def cut_out(graph, x: fx.Node, out: fx.Node) -> tuple[torch.nn.Module, fx.Graph]:
    """The nodes computing ``out`` from ``x`` and constants, as a (root, graph)
    pair for ``fx.GraphModule``: ``x`` becomes the only input."""
    needed, work = set(), [out]
    while work:
        n = work.pop()
        if n in needed or n is x:
            continue
        if n.op == "placeholder":
            raise ValueError(f"{out.name} depends on graph input {n.name}, not only on {x.name}")
        needed.add(n)
        work.extend(n.all_input_nodes)
    root, cut = torch.nn.Module(), fx.Graph()
    env = {x: cut.placeholder("x")}
    for n in graph.fx.nodes:
        if n not in needed:
            continue
        if n.op == "get_attr":
            name = f"c{len(env)}"
            constant = graph.constant(n)
            # a weight made inside torch.inference_mode() cannot be traced outside it
            root.register_buffer(name, constant.clone() if constant.is_inference() else constant)
            env[n] = cut.get_attr(name)
        else:
            env[n] = cut.node_copy(n, lambda a: env[a])
    cut.output(env[out])
    return root, cut


def time_float_and_quantized(graph, layer: Layer, new: fx.Node, backend: str, tokens: int) -> tuple[float, float]:
    """Median times (ms) of the float linear and of the nodes replacing it,
    on ``backend`` with a random input of ``tokens`` rows."""
    compile_for = target(backend)
    x = torch.randn(tokens, layer.weight.shape[1])
    times = []
    for out in (layer.node, new):
        module = fx.GraphModule(*cut_out(graph, layer.x, out))
        model = compile_for(trace(module, (x,), name=f"{layer.name}-guard"))
        times.append(median_ms(lambda: model(x)))
    return times[0], times[1]


def erase_chain(graph, node: fx.Node, stop: fx.Node) -> None:
    """Erase ``node`` and the now-unused nodes it was built from."""
    work = [node]
    while work:
        n = work.pop()
        if n.users or n is stop or n.op == "placeholder" or n.graph is not graph.fx:
            continue
        inputs = list(n.all_input_nodes)
        graph.fx.erase_node(n)
        work.extend(inputs)
