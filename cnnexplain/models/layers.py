"""Layers by dotted name: look them up, record their outputs, and cut a model at one of them.

``get_module(model, "layer4.1.conv2")`` finds a layer (with close-match suggestions when the name
is wrong); :func:`record` captures layer outputs with forward hooks; :func:`split_at` cuts a model
into ``body`` (input -> target layer output, plus whatever else later layers still need, such as
a ResNet skip input) and ``tail`` (those -> logits) with torch.fx, so that a gated pathway or an
intervention at the layer re-runs only the part of the network after it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from cnnexplain.errors import UsageError, close_matches


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted path), or a UsageError listing close matches."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    names = layer_names(model)
    top = sorted({n.split(".")[0] for n in names})
    raise UsageError(f"layer {name!r} does not exist in this model{close_matches(name, names)}",
                     f"pass `layer` with a dotted module name such as {', '.join(top[-3:])}")


def parse_layers(text: str | Sequence[str] | None) -> list[str]:
    """``"layer3,layer4"`` -> ``["layer3", "layer4"]``."""
    if text is None:
        return []
    if isinstance(text, str):
        text = [text]
    out: list[str] = []
    for t in text:
        out.extend(p.strip() for p in str(t).split(",") if p.strip())
    return out


@contextlib.contextmanager
def record(model: nn.Module, layers: Sequence[str], detach: bool = True) -> Iterator[dict]:
    """Record the outputs of ``layers`` while the block runs: ``with record(m, ["layer4"]) as
    acts: m(x)`` leaves ``acts["layer4"]`` = the layer's output of the last forward pass.
    With ``detach`` the output is copied, so an in-place operation that follows the layer (an
    ``nn.ReLU(inplace=True)`` after a BatchNorm, ResNet's ``out += identity``) cannot change
    what was recorded. Hooks are always removed, also on error."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in layers:
            module = get_module(model, name)

            def hook(_m, _inp, out, _name=name):
                if isinstance(out, (tuple, list)):
                    out = out[0]
                store[_name] = out.detach().clone() if detach else out

            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


class _Tracer(torch.fx.Tracer):
    """Keeps torch.nn / torchvision.ops modules and the target layer as single graph nodes."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname == self.target:
            return True
        mod = type(m).__module__
        if mod.startswith("torchvision.ops"):
            return True
        return super().is_leaf_module(m, qualname)


class Split(nn.Module):
    """``body(x) -> (a, *extras)`` and ``tail(a, *extras) -> logits``; ``forward`` = both.

    Parameters are shared with the model the split was made from (no copies). ``tail`` never
    modifies ``a`` (it starts from a copy), so ``a`` can be reused, e.g. for a gated pathway.
    """

    def __init__(self, body: nn.Module, tail: nn.Module, layer: str, n_extras: int):
        super().__init__()
        self.body = body
        self.tail = tail
        self.layer = layer
        self.n_extras = n_extras

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, *extras = self.body(x)
        return self.tail(a, *extras)


def split_at(model: nn.Module, layer: str) -> Split:
    """Cut ``model`` at the output of ``layer`` (see module docstring).

    Raises a UsageError when the layer does not exist, cannot be traced, or is called more
    than once per forward pass (a reused module such as ResNet's ``relu``).
    """
    get_module(model, layer)
    tracer = _Tracer(layer)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # symbolic tracing failed on data-dependent control flow
        raise UsageError(f"cannot cut the model at {layer!r}: torch.fx could not trace it ({exc})",
                         "choose another `layer`, such as the backbone's default") from None
    hits = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(hits) != 1:
        raise UsageError(f"layer {layer!r} runs {len(hits)} times per forward pass, so its output "
                         "is ambiguous", "choose a layer that runs exactly once, e.g. its parent block")
    target = hits[0]

    after: set[torch.fx.Node] = set()
    frontier = [target]
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u not in after:
                after.add(u)
                frontier.append(u)
    ordered = list(graph.nodes)
    extras = []
    for n in ordered:
        if n in after:
            for a in n.all_input_nodes:
                if a is not target and a not in after and a.op != "get_attr" and a not in extras:
                    extras.append(a)
    extras.sort(key=ordered.index)

    body_graph = torch.fx.Graph()
    env: dict = {}
    needed = _ancestors([target, *extras])
    for n in ordered:
        if n in needed:
            env[n] = body_graph.node_copy(n, lambda x: env[x])
    body_graph.output(tuple(env[n] for n in [target, *extras]))

    tail_graph = torch.fx.Graph()
    tenv: dict = {}
    # the tail works on a copy: an in-place op right after the layer (DenseNet's
    # F.relu(..., inplace=True), ResNet's relu_) must not change the caller's activation
    tenv[target] = tail_graph.call_method("clone", (tail_graph.placeholder("activation"),))
    for i, n in enumerate(extras):
        tenv[n] = tail_graph.placeholder(f"extra_{i}")
    for n in ordered:
        if n in after and n.op != "output":
            tail_graph_node = tail_graph.node_copy(n, lambda x: _tail_arg(x, tenv, tail_graph))
            tenv[n] = tail_graph_node
        elif n.op == "output":
            tail_graph.output(_map(n.args[0], tenv))
    body = torch.fx.GraphModule(model, body_graph, class_name="Body")
    tail = torch.fx.GraphModule(model, tail_graph, class_name="Tail")
    return Split(body, tail, layer, len(extras))


def _tail_arg(x, tenv, graph):
    if x not in tenv:  # a get_attr constant used after the cut
        tenv[x] = graph.node_copy(x, lambda y: tenv[y])
    return tenv[x]


def _map(arg, env):
    return torch.fx.node.map_arg(arg, lambda n: env[n])


def _ancestors(nodes) -> set:
    seen: set = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def layer_shapes(backbone: str, size: int = 64, num_classes: int | None = None,
                 insert: int | None = None, stem: str | None = None
                 ) -> tuple[list[dict], int, str]:
    """Every named module of ``backbone`` with its type and output shape ``[C, H, W]`` for a
    ``size`` x ``size`` input (at least the backbone's minimum), and whether it is the
    default target layer, for the stem ``stem`` (None / ``auto``: the one
    :func:`cnnexplain.models.zoo.choose_stem` picks for that input, as training does):
    ``(rows, size used, stem)``."""
    from cnnexplain.models import zoo
    from cnnexplain.models.network import build_network

    spec = zoo.get_spec(backbone)
    size = max(size, spec.min_size)
    stem = zoo.choose_stem(spec, stem, size)
    model, target = build_network(backbone, num_classes or 10, insert=insert, stem=stem)
    model.eval()
    shapes: dict[str, list[int]] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m, _i, out, _n=name):
            if isinstance(out, torch.Tensor):
                shapes[_n] = list(out.shape[1:])

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    rows = [{"layer": n, "type": type(m).__name__, "output": shapes.get(n), "default": n == target}
            for n, m in model.named_modules() if n]
    return rows, size, stem


ONE_BY_ONE_FIX = ("train with the small-input stem (`stem=small`, the default for inputs of at "
                  "most 64 px), raise `resize`, or choose an earlier `layer`")


def one_by_one(layer: str, size: tuple[int, int], what: str) -> str:
    """The problem of a localizing method (Grad-CAM, dissection) at a layer whose map is a
    single position: its maps would be uniform."""
    return (f"layer {layer!r} has a 1x1 map at {size[0]}x{size[1]} inputs, so {what} cannot "
            "localize anything (every map would be uniform)")
