"""What each fx node of a classifier is for LRP: its *kind* (the relevance rule the reverse pass applies),
the operations supported for each kind, and `classify`, which turns a node into a `Step` with a forward
callable that never writes in place. `graph` builds the plan from these steps."""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from isnet_cli.errors import ModelError

# Kinds of step, i.e. which rule the reverse pass applies.
INPUT = "input"  # the image placeholder
CONV = "conv"  # Conv1d/2d/3d module
LINEAR = "linear"  # nn.Linear / F.linear
BN = "bn"  # batch norm module: fused into its producer, or a per-channel linear map
MAXPOOL = "maxpool"  # winner-take-all with stored indices
AVGPOOL = "avgpool"  # average pools, adaptive pools and means: uniform linear maps
ACT = "act"  # element-wise activation: relevance passes
PASS = "pass"  # shape-only ops (flatten, view, dropout, identity): relevance (and gradient messages) reshape
ADD = "add"  # sum of tensors: proportional split
SUB = "sub"  # difference of tensors: signed proportional split
MUL = "mul"  # product: multiplicative gating, all relevance to the non-gate operand
DIV = "div"  # division by a constant or a gate: relevance passes to the numerator
CAT = "cat"  # concatenation: channel split
GETITEM = "getitem"  # indexing: relevance scattered back to the indexed positions
NOOP = "noop"  # no tensor flows through (size, getattr, constants)
OUTPUT = "output"

_ACT_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Softplus,
    nn.Softsign,
)
_GATE_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.Softmax)
_PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
)
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVGPOOL_MODULES = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)

_ACT_FUNCS: set[Any] = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.softplus,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
}
_GATE_FUNCS: set[Any] = {torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.tanh, F.tanh, F.softmax, torch.softmax}
_PASS_FUNCS: set[Any] = {
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
}
_ADD_FUNCS: set[Any] = {operator.add, operator.iadd, torch.add}
_SUB_FUNCS: set[Any] = {operator.sub, operator.isub, torch.sub}
_MUL_FUNCS: set[Any] = {operator.mul, operator.imul, torch.mul}
_DIV_FUNCS: set[Any] = {operator.truediv, operator.itruediv, torch.div}
_CAT_FUNCS: set[Any] = {torch.cat, torch.concat}
_AVGPOOL_FUNCS: set[Any] = {
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    torch.mean,
}
_MAXPOOL_FUNCS: set[Any] = {F.max_pool1d, F.max_pool2d, F.max_pool3d}
_NOOP_FUNCS: set[Any] = {getattr, len}
_OUT_OF_PLACE = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}

_ACT_METHODS = {"relu", "sigmoid", "tanh", "clamp", "clip"}
_GATE_METHODS = {"sigmoid", "tanh", "softmax"}
_PASS_METHODS = {
    "view",
    "reshape",
    "flatten",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "clone",
    "view_as",
    "reshape_as",
    "float",
    "to",
    "type_as",
    "detach",
}
_NOOP_METHODS = {"size", "dim", "numel", "type", "__len__"}
_ADD_METHODS = {"add"}
_SUB_METHODS = {"sub"}
_MUL_METHODS = {"mul"}
_DIV_METHODS = {"div"}
_AVGPOOL_METHODS = {"mean"}


def _is_stochastic_depth(target: Any) -> bool:
    """torchvision's `stochastic_depth` is an fx-wrapped function: match it by name, not import."""
    return getattr(target, "__name__", "") == "stochastic_depth"


@dataclass
class Step:
    """One node of the captured graph: its rule (`kind`), its forward callable and its inputs."""

    node: fx.Node
    kind: str
    name: str  # node name and, for modules, the module path (for error messages)
    fn: Callable[..., Any] | None = None
    module: nn.Module | None = None
    tensor_inputs: list[fx.Node] = field(default_factory=list)
    returns_indices: bool = False  # max pools: the forward returns (values, indices)
    fused_bn: Step | None = None  # conv/linear whose only consumer is this batch norm (fused)
    absorbed: bool = False  # batch norm fused into its producing conv/linear
    gate_like: bool = False  # output of a sigmoid-like op (squeeze-excitation gate)
    first: bool = False  # a linear op reading the input image (LRP-zB)
    is_relu: bool = False  # a plain ReLU (relevance is zero wherever its output is zero)
    relu_user: fx.Node | None = None  # the single consumer, when it is a plain ReLU
    nonneg_input: bool = False  # a pool whose input is a ReLU output (so its output is >= 0)
    # conv/linear reading act(BN(x)), each the only consumer of the one before (DenseNet's BN-ReLU-conv):
    # when differentiating, this step's rule also applies the activation's and the BN's
    preact_bn: Step | None = None
    # values the reverse pass reads only for their shape when differentiating, released after this step
    release_after: list[fx.Node] = field(default_factory=list)


def _out_of_place_module(module: nn.Module) -> nn.Module:
    """A shallow copy with ``inplace=False`` (parameters stay shared) for modules that write in place."""
    if getattr(module, "inplace", False):
        module = copy.copy(module)
        module.inplace = False
    return module


def _strip_inplace(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k != "inplace"} if "inplace" in kwargs else kwargs


def _method_caller(name: str) -> Callable[..., Any]:
    # x.relu_() -> x.relu(); x.add_(y) -> x.add(y): the stored activation must not be overwritten
    if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
        name = name[:-1]

    def call(obj: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(obj, name)(*args, **kwargs)

    return call


def _function_caller(target: Any) -> Callable[..., Any]:
    target = _OUT_OF_PLACE.get(target, target)

    def call(*args: Any, **kwargs: Any) -> Any:
        return target(*args, **_strip_inplace(kwargs))

    return call


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _module_path(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.name} (module {node.target}: {type(gm.get_submodule(str(node.target))).__name__})"
    if node.op == "call_function":
        return f"{node.name} (function {getattr(node.target, '__name__', node.target)})"
    return f"{node.name} ({node.op} {node.target})"


def classify(gm: fx.GraphModule, node: fx.Node) -> Step:
    """The reverse-pass step of one graph node: which rule, and what to run it with."""
    name = _module_path(gm, node)
    if node.op == "placeholder":
        return Step(node, INPUT, name)
    if node.op == "output":
        return Step(node, OUTPUT, name)
    if node.op == "get_attr":
        return Step(node, NOOP, name, fn=None)
    inputs = _tensor_inputs(node)
    step = None
    if node.op == "call_module":
        step = _classify_module(gm.get_submodule(str(node.target)), node, name, inputs)
    elif node.op == "call_function":
        step = _classify_function(node, name, inputs)
    elif node.op == "call_method":
        step = _classify_method(node, name, inputs)
    if step is None:
        raise ModelError(
            f"unsupported operation for LRP at {name}; supported: conv, linear, batch norm, pooling, add, "
            "concatenation, flatten, dropout and element-wise activations"
        )
    return step


def _module_kind(module: nn.Module, name: str) -> str | None:
    """The rule of a module that is not max pooling (None: unsupported)."""
    if isinstance(module, _CONV_MODULES):
        if module.padding_mode != "zeros" or (isinstance(module.padding, str) and module.padding != "valid"):
            raise ModelError(
                f"unsupported convolution at {name}: padding {module.padding!r}, mode "
                f"{module.padding_mode!r}; LRP supports numeric zero padding"
            )
        return CONV
    kinds = (
        (nn.Linear, LINEAR),
        (nn.modules.batchnorm._BatchNorm, BN),
        (_AVGPOOL_MODULES, AVGPOOL),
        (_ACT_MODULES, ACT),
        (_PASS_MODULES, PASS),
    )
    for types, kind in kinds:
        if isinstance(module, types):
            return kind
    return PASS if type(module).__name__ == "StochasticDepth" else None


def _classify_module(module: nn.Module, node: fx.Node, name: str, inputs: list[fx.Node]) -> Step:
    """A module call: max pooling with indices, or the module's rule."""
    if isinstance(module, _MAXPOOL_MODULES):
        step = Step(node, MAXPOOL, name, module=module, tensor_inputs=inputs[:1])
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[int(type(module).__name__[-2])]
        step.fn = _maxpool_with_indices(pool, module)
        step.returns_indices = True
        return step
    kind = _module_kind(module, name)
    if kind is None:
        raise ModelError(
            f"unsupported layer for LRP at {name}; supported: conv, linear, batch norm, pooling, "
            "add, concatenation, flatten, dropout and element-wise activations"
        )
    step = Step(node, kind, name, fn=_out_of_place_module(module), module=module, tensor_inputs=inputs[:1])
    step.gate_like = isinstance(module, _GATE_MODULES)
    return step


def _from_table(
    node: fx.Node, name: str, inputs: list[fx.Node], fn: Callable[..., Any], key: Any, table: Sequence[Any], gates: Any
) -> Step | None:
    """The step for the first (members, kind) of `table` whose members hold `key` (a function or method name)."""
    for members, kind in table:
        if key in members:
            keep = inputs if kind in (ADD, SUB, MUL, DIV) else inputs[:1]
            step = Step(node, kind, name, fn=fn, tensor_inputs=keep)
            step.gate_like = key in gates
            return step
    return None


def _classify_function(node: fx.Node, name: str, inputs: list[fx.Node]) -> Step | None:
    """A function call (torch, F or operator); None when unsupported."""
    target = node.target
    fn = _function_caller(target)
    if target in _MAXPOOL_FUNCS:
        step = Step(node, MAXPOOL, name, fn=_maxpool_fn_with_indices(target), tensor_inputs=inputs[:1])
        step.returns_indices = True
        return step
    if target in _CAT_FUNCS:
        return Step(node, CAT, name, fn=fn, tensor_inputs=inputs)
    if target is F.linear:
        return Step(node, LINEAR, name, fn=fn, tensor_inputs=inputs[:1])
    table = [
        (_ACT_FUNCS, ACT),
        (_PASS_FUNCS, PASS),
        (_ADD_FUNCS, ADD),
        (_SUB_FUNCS, SUB),
        (_MUL_FUNCS, MUL),
        (_DIV_FUNCS, DIV),
        (_AVGPOOL_FUNCS, AVGPOOL),
        (_NOOP_FUNCS, NOOP),
    ]
    step = _from_table(node, name, inputs, fn, target, table, _GATE_FUNCS)
    if step is None and _is_stochastic_depth(target):
        return Step(node, PASS, name, fn=fn, tensor_inputs=inputs[:1])
    if step is None and target is operator.getitem:
        return Step(node, GETITEM, name, fn=fn, tensor_inputs=inputs[:1])
    return step


def _classify_method(node: fx.Node, name: str, inputs: list[fx.Node]) -> Step | None:
    """A tensor method call (in-place `x.relu_()` as `relu`); None when unsupported."""
    method = str(node.target)
    base = method[:-1] if method.endswith("_") and not method.startswith("_") else method
    table = [
        (_ACT_METHODS, ACT),
        (_PASS_METHODS, PASS),
        (_ADD_METHODS, ADD),
        (_SUB_METHODS, SUB),
        (_MUL_METHODS, MUL),
        (_DIV_METHODS, DIV),
        (_AVGPOOL_METHODS, AVGPOOL),
        (_NOOP_METHODS, NOOP),
    ]
    return _from_table(node, name, inputs, _method_caller(method), base, table, _GATE_METHODS)


def _maxpool_with_indices(pool: Callable[..., Any], m: nn.Module) -> Callable[..., Any]:
    def call(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pool(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)

    return call


def _maxpool_fn_with_indices(target: Any) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = {**kwargs, "return_indices": True}
        return target(*args, **kwargs)

    return call
