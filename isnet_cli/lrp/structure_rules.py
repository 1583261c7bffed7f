"""LRP rules for the steps without weights: activations, reshapes, concatenation, indexing, sums,
gating products and divisions.

Each rule is a method `_rule_<kind>(step, R, G, env, side, send, K, differentiating)` that sends
messages to the step's inputs; `LRP` mixes these in and provides `_divide` (the ε division) and
`_plans_step`.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from isnet_cli.errors import ModelError
from isnet_cli.lrp.messages import total, upcast
from isnet_cli.lrp.transpose import sum_to

_RESHAPE_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten)
_RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}


class StructureRules:
    """Rules that route relevance by the structure of the graph (no weights of their own)."""

    def _rule_noop(self, step, r, g, env, side, send, k, differentiating) -> None:
        return None

    def _rule_act(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Element-wise activation: R_in = R_out (the ε-rule of the next linear layer already
        restricts relevance to active units); a gradient message becomes relevance first."""
        r = total(r, g, upcast(env[step.node]))
        src = step.tensor_inputs[0]
        send(src, r=r.reshape(k, *env[src].shape))

    def _rule_pass(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Shape-only ops move relevance (and gradient messages) back to the input's shape."""
        src = step.tensor_inputs[0]
        reshape_only = isinstance(step.module, _RESHAPE_MODULES) or (
            step.module is None and (step.node.op == "call_method" or step.node.target in _RESHAPE_FUNCS)
        )
        if g is not None and not reshape_only:
            r, g = total(r, g, upcast(env[step.node])), None
        shape = (k, *env[src].shape)
        send(
            src,
            r=None if r is None else r.reshape(shape),
            g=None if g is None else g.reshape(shape),
        )

    def _rule_cat(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Concatenation: relevance (and gradient messages) split by channel back to each input."""
        node = step.node
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = list(node.args[0])
        ndim = env[node].dim()
        dim = dim % ndim + 1  # + 1 for the map dimension
        sizes = [env[p].shape[dim - 1] if isinstance(p, fx.Node) else p.shape[dim - 1] for p in parts]
        r_parts = r.split(sizes, dim=dim) if r is not None else [None] * len(parts)
        g_parts = g.split(sizes, dim=dim) if g is not None else [None] * len(parts)
        for part, rp, gp in zip(parts, r_parts, g_parts, strict=True):
            if isinstance(part, fx.Node):
                send(part, r=rp, g=gp)

    def _rule_getitem(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Indexing: relevance scattered back into zeros at the indexed positions."""
        src = step.tensor_inputs[0]
        a = env[src]
        if not isinstance(a, torch.Tensor):
            raise ModelError(f"unsupported indexing of a non-tensor on the relevance path at {step.name}")
        index = fx.node.map_arg(step.node.args[1], env.__getitem__)  # indices may be computed tensors
        index = index if isinstance(index, tuple) else (index,)
        r = total(r, g, upcast(env[step.node]))
        out = r.new_zeros((k, *a.shape))
        out[(slice(None), *index)] = r
        send(src, r=out)

    def _rule_add(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Sum y = Σ x_i: R_i = x_i ⊙ R / (y + ε·sign(y)); constant summands absorb their share."""
        self._split_sum(step, r, g, env, send, k, signs=[1.0] * len(step.node.args), differentiating=differentiating)

    def _rule_sub(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Difference y = x_1 − x_2: R_1 = x_1 ⊙ R/stab(y), R_2 = −x_2 ⊙ R/stab(y)."""
        self._split_sum(step, r, g, env, send, k, signs=[1.0, -1.0], differentiating=differentiating)

    def _split_sum(self, step, r, g, env, send, k, signs, differentiating) -> None:
        y = upcast(env[step.node])
        r = total(r, g, y)
        s = self._divide(step, r, y, env, differentiating)
        for arg, sign in zip(step.node.args, signs, strict=False):
            if isinstance(arg, fx.Node) and isinstance(env[arg], torch.Tensor):
                xi = upcast(env[arg])
                share = xi * s if sign > 0 else -xi * s
                send(arg, r=sum_to(share, (k, *xi.shape)))

    def _rule_mul(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Multiplicative gating x ⊙ gate: all relevance goes to x, the gate is held constant.

        The gate is the operand computed by a sigmoid-like op (squeeze-excitation); otherwise the
        broadcast (smaller) operand. Products of two same-sized feature maps are refused.
        """
        r = total(r, g, upcast(env[step.node]))
        operands = [a for a in step.node.args if isinstance(a, fx.Node) and isinstance(env[a], torch.Tensor)]
        if len(operands) == 1:
            target = operands[0]
        else:
            gates = [a for a in operands if self._plans_step(a).gate_like]
            if len(gates) == 1:
                target = next(a for a in operands if a is not gates[0])
            else:
                sizes = [env[a].numel() for a in operands]
                if sizes[0] == sizes[1]:
                    raise ModelError(
                        f"cannot tell the gate from the signal in the product at {step.name}; "
                        "LRP supports multiplicative gating by a sigmoid-like or broadcast factor"
                    )
                target = operands[0] if sizes[0] > sizes[1] else operands[1]
        send(target, r=sum_to(r, (k, *env[target].shape)))

    def _rule_div(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Division by a constant or a gate: relevance passes to the numerator."""
        num = step.node.args[0]
        if isinstance(num, fx.Node):
            r = total(r, g, upcast(env[step.node]))
            send(num, r=sum_to(r, (k, *env[num].shape)))
