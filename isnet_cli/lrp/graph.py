"""Capture a classifier with torch.fx and turn its graph into a plan of LRP steps.

Each fx node becomes a `Step` (`nodes.classify`) with a *kind* that names the relevance rule applied to
it in the reverse pass, and a forward callable that never writes in place (``ReLU(inplace=True)``, ``F.relu(x,
inplace=True)``, ``x.relu_()`` and ``out += identity`` all run as their out-of-place versions), so the
activations stored for the reverse pass are the ones the forward computed. Re-used modules (one
``nn.ReLU`` called several times, as in torchvision's ResNet) are harmless: every *call* is its own
node with its own stored output.

Tracing bakes Python branches on ``self.training`` into the graph, so plans are cached per pattern
of module training flags (see `PlanCache`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from isnet_cli.errors import ModelError
from isnet_cli.lrp.nodes import ACT, AVGPOOL, BN, CONV, INPUT, LINEAR, MAXPOOL, OUTPUT, PASS, Step, classify


@dataclass
class Plan:
    """The steps of a traced model in topological order."""

    steps: list[Step]
    by_node: dict[fx.Node, Step]
    input_node: fx.Node
    output_node: fx.Node  # the node whose value is the model output (the logits)
    hidden: dict[str, fx.Node] = field(default_factory=dict)  # layers whose relevance is recorded, by name


class _Tracer(fx.Tracer):
    """fx tracer that keeps stochastic-depth and dropout modules as leaves (they pass relevance)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m).__name__ == "StochasticDepth":
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace `model`; raise `ModelError` when torch.fx cannot capture it."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {first}); "
            "LRP needs a model without data-dependent Python control flow"
        ) from exc
    return fx.GraphModule(model, graph)


def _is_plain_relu(step: Step) -> bool:
    node = step.node
    if node.op == "call_module":
        return type(step.module) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _through_pass(step: Step, by_node: dict[fx.Node, Step]) -> Step:
    """The producer of a step's input, looking through shape-only steps (flatten, view, dropout)."""
    while step.kind == PASS and step.tensor_inputs:
        step = by_node[step.tensor_inputs[0]]
    return step


def layer_output(gm: fx.GraphModule, name: str) -> fx.Node:
    """The node whose value is the output of module `name` (a dotted module path: its last node in the
    graph), or the node called `name`; a `ModelError` naming candidates otherwise."""
    nodes = list(gm.graph.nodes)
    inside = [n for n in nodes if any(key.split("@")[0] == name for key in (n.meta.get("nn_module_stack") or {}))]
    if inside:
        return inside[-1]
    by_name = next((n for n in nodes if n.name == name), None)
    if by_name is not None and by_name.op not in ("placeholder", "output"):
        return by_name
    children = ", ".join(child for child, _ in gm.named_children()) or "none"
    raise ModelError(
        f"no layer {name!r} in the traced model; give a module path (top-level modules: {children}) or an fx node name"
    )


def build_plan(gm: fx.GraphModule, hidden: Sequence[str] = ()) -> Plan:
    """Classify every node and mark BN fusion, gates and the first (LRP-zB) layer; `hidden` names the
    layers whose relevance is recorded (module paths or node names)."""
    steps = [classify(gm, node) for node in gm.graph.nodes]
    by_node = {s.node: s for s in steps}
    inputs = [s for s in steps if s.kind == INPUT]
    if len(inputs) != 1:
        raise ModelError(f"LRP needs a model with exactly one input; this one takes {len(inputs)}")
    out = next(s for s in steps if s.kind == OUTPUT)
    result = out.node.args[0]
    if not isinstance(result, fx.Node):
        raise ModelError("LRP needs a model that returns one logits tensor (not a tuple or dict)")
    for step in steps:
        step.is_relu = step.kind == ACT and _is_plain_relu(step)
    for step in steps:
        users = list(step.node.users)
        if len(users) == 1 and by_node[users[0]].is_relu:
            step.relu_user = users[0]
        if step.kind in (MAXPOOL, AVGPOOL) and step.tensor_inputs:
            step.nonneg_input = by_node[step.tensor_inputs[0]].is_relu
        # gate detection: a gate is a sigmoid-like output, possibly reshaped
        if step.kind == PASS and step.tensor_inputs and by_node[step.tensor_inputs[0]].gate_like:
            step.gate_like = True
        if step.kind == BN and step.tensor_inputs:
            producer = by_node[step.tensor_inputs[0]]
            # a BN that is the only consumer of a conv/linear output is fused into it
            if producer.kind in (CONV, LINEAR) and len(producer.node.users) == 1:
                producer.fused_bn = step
                step.absorbed = True
        if (
            step.kind in (CONV, LINEAR)
            and step.tensor_inputs
            and _through_pass(by_node[step.tensor_inputs[0]], by_node).kind == INPUT
        ):
            step.first = True
    recorded = {name: layer_output(gm, name) for name in hidden}
    kept = set(recorded.values())  # their relevance must arrive as a message of its own
    for step in steps:
        if step.kind in (CONV, LINEAR) and step.tensor_inputs and not step.first:
            act = by_node[step.tensor_inputs[0]]
            if act.kind == ACT and len(act.node.users) == 1 and act.tensor_inputs and act.node not in kept:
                bn = by_node[act.tensor_inputs[0]]
                if bn.kind == BN and not bn.absorbed and len(bn.node.users) == 1 and bn.node not in kept:
                    step.preact_bn = bn
    _mark_releases(steps, by_node, kept)
    return Plan(steps, by_node, inputs[0].node, result, recorded)


def _mark_releases(steps: list[Step], by_node: dict[fx.Node, Step], kept: set[fx.Node]) -> None:
    """Batch-norm outputs read only by element-wise activations are needed by the differentiating
    reverse pass for their shape alone (the BN and activation rules recompute or skip the value), while
    autograd keeps the activation's output, not its input: holding them would cost one activation per
    BN (on DenseNet a tenth of a training step's memory). Each is released after its last reader."""
    order = {s.node: i for i, s in enumerate(steps)}
    for step in steps:
        users = list(step.node.users)
        if step.kind == BN and users and step.node not in kept and all(by_node[u].kind == ACT for u in users):
            last = max(users, key=order.__getitem__)
            by_node[last].release_after.append(step.node)


class PlanCache:
    """Traced plans of one model, keyed by the training flags of its modules.

    fx bakes ``self.training`` branches (e.g. DenseNet's functional dropout) into the graph, so a
    model is traced once per train/eval pattern and the plan is reused for every later call.
    """

    def __init__(self, model: nn.Module, hidden: Sequence[str] = ()) -> None:
        self.model = model
        self.hidden = tuple(hidden)
        self._plans: dict[tuple[bool, ...], tuple[fx.GraphModule, Plan]] = {}

    def get(self) -> tuple[fx.GraphModule, Plan]:
        key = tuple(m.training for m in self.model.modules())
        if key not in self._plans:
            gm = trace(self.model)
            self._plans[key] = (gm, build_plan(gm, self.hidden))
        return self._plans[key]
