"""The relevance engine: run the captured graph forward, then propagate relevance node by node.

The forward is the model's own computation (in train mode it *is* the training forward: batch norm
uses and updates batch statistics), run over the fx graph with every activation kept. The reverse
pass applies one explicit rule per node (see `rules`), so the returned heatmap is differentiable in
the weights and activations with an ordinary backward.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from isnet_cli.errors import ModelError
from isnet_cli.lrp import graph as G
from isnet_cli.lrp import rules
from isnet_cli.lrp.names import FIRST_RULES, RULES
from isnet_cli.lrp.nodes import BN, CONV, INPUT, OUTPUT, Step
from isnet_cli.lrp.targets import initial_message

_RESHAPE_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten)
_RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}

Message = list  # [relevance or None, gradient message or None], both (K, *activation shape)


def _hp(t: Any) -> Any:
    """Half-precision activations (autocast) are upcast: relevance is always fp32 (fp64 kept)."""
    if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def _batch_statistics(out: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, 1/sqrt(var + eps)) that a train-mode batch norm normalised `out` with, as its autograd
    node keeps them, or None (no gradient recorded, or another BN kernel): then they are recomputed."""
    fn = getattr(out, "grad_fn", None)
    if type(fn).__name__ == "NativeBatchNormBackward0" and fn._saved_training:
        return fn._saved_result1, fn._saved_result2
    return None


class LRP:
    """Layer-wise relevance propagation for a torch.fx-traceable classifier.

    ``lrp = LRP(model, epsilon=0.01, first_rule="zb", low=0.0, high=1.0)``;
    ``R = lrp(x, target)`` with target an int, a LongTensor (B,), ``"predicted"``, ``"all"``,
    ``"selective"`` or ``"stochastic"``; R has shape (B, C, H, W), or (B, K, C, H, W) for ``"all"``.
    ``lrp.logits`` holds the forward output of the last call (with its autograd graph).

    Rules: LRP-ε (z + ε·sign(z), sign(0) = +1) for conv, linear and average pools, batch norm fused
    into its producer (detached batch statistics in train mode), LRP-zB with bounds [low, high] at
    the first layer, winner-take-all max pooling, proportional split for sums, channel split for
    concatenations, pass-through for element-wise activations, gates of multiplicative gating held
    constant. ``rule="zplus"`` / ``"alphabeta"`` (α = 2, β = 1) replace ε at conv/linear layers, for
    explanations only.

    ``hidden``: layers (module paths such as ``"layer2"``, or fx node names) whose output relevance
    each call also records in ``lrp.hidden[name]``, laid out as R (LRP deep supervision).
    """

    def __init__(
        self,
        model: nn.Module,
        epsilon: float = 0.01,
        first_rule: str = "zb",
        low: float = 0.0,
        high: float = 1.0,
        rule: str = "epsilon",
        alpha: float = 2.0,
        beta: float = 1.0,
        hidden: Sequence[str] = (),
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        if first_rule not in FIRST_RULES:
            raise ValueError(f"first_rule must be one of {', '.join(FIRST_RULES)}, got {first_rule!r}")
        if rule == "alphabeta" and abs(alpha - beta - 1.0) > 1e-6:
            raise ValueError(f"alpha-beta needs alpha - beta = 1, got alpha={alpha}, beta={beta}")
        # DistributedDataParallel: trace the wrapped module, but let DDP see every forward (its
        # reducer must be prepared for the backward that follows)
        self.ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        self.model = model.module if self.ddp is not None else model
        self.epsilon = float(epsilon)
        self.first_rule = first_rule
        self.low = float(low)
        self.high = float(high)
        self.rule = rule
        self.alpha, self.beta = (1.0, 0.0) if rule == "zplus" else (float(alpha), float(beta))
        self.logits: torch.Tensor | None = None
        self.hidden: dict[str, torch.Tensor] = {}
        self._plans = G.PlanCache(self.model, hidden)
        self._plan = self._plans.get()[1]  # trace now: an untraceable or unsupported model fails here

    # ---------------------------------------------------------------- forward
    def _forward(self, gm: fx.GraphModule, plan: G.Plan, x: torch.Tensor):
        env: dict[fx.Node, Any] = {}
        # side outputs of the forward: max-pool argmax indices, batch-norm batch statistics
        side: dict[fx.Node, Any] = {}
        # a value whose shape is all the reverse pass reads becomes a meta tensor (any other use fails loudly)
        release = torch.is_grad_enabled()
        for step in plan.steps:
            node = step.node
            if step.kind == INPUT:
                env[node] = x
            elif step.kind == OUTPUT:
                continue
            elif node.op == "get_attr":
                env[node] = functools.reduce(getattr, str(node.target).split("."), gm)
            else:
                args = fx.node.map_arg(node.args, env.__getitem__)
                kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
                out = step.fn(*args, **kwargs)
                if step.returns_indices:
                    out, side[node] = out
                elif step.kind == BN:
                    side[node] = _batch_statistics(out)
                env[node] = out
                if release:
                    for done in step.release_after:
                        env[done] = env[done].detach().to("meta")
        return env, side

    # ---------------------------------------------------------------- public call
    def __call__(self, x: torch.Tensor, target: int | str | torch.Tensor = "predicted") -> torch.Tensor:
        if self.rule != "epsilon" and self.model.training:
            raise ModelError(
                f"the {self.rule} rule is for explanations only; put the model in eval mode, "
                "or use rule='epsilon' for training"
            )
        gm, plan = self._plans.get()
        self._plan = plan
        if self.ddp is not None:
            (x,), _ = self.ddp._pre_forward(x)
        env, side = self._forward(gm, plan, x)
        logits = env[plan.output_node]
        if self.ddp is not None:
            logits = self.ddp._post_forward(logits)
            env[plan.output_node] = logits
        if not isinstance(logits, torch.Tensor):
            raise ModelError("LRP needs a model that returns one logits tensor (not a tuple or dict)")
        self.logits = logits
        kind, start = initial_message(logits, target)
        device_type = x.device.type if x.device.type in ("cuda", "cpu") else "cpu"
        recorded: dict[fx.Node, torch.Tensor] = {}
        with torch.autocast(device_type=device_type, enabled=False):
            relevance = self._reverse(plan, env, side, kind, start, recorded)
        if relevance is None:
            relevance = torch.zeros((start.shape[0], *x.shape), dtype=start.dtype, device=x.device)
        per_class = isinstance(target, str) and target == "all"

        def layout(t: torch.Tensor) -> torch.Tensor:  # (K, B, ...) -> (B, K, ...) or (B, ...)
            return t.transpose(0, 1) if per_class else t[0]

        self.hidden = {name: layout(recorded[node]) for name, node in plan.hidden.items()}
        return layout(relevance)

    # ---------------------------------------------------------------- reverse
    def _reverse(self, plan, env, side, kind, start, recorded) -> torch.Tensor | None:
        k = start.shape[0]
        watched = set(plan.hidden.values())
        msgs: dict[fx.Node, Message] = {}

        def send(node: fx.Node, r: torch.Tensor | None = None, g: torch.Tensor | None = None) -> None:
            box = msgs.setdefault(node, [None, None])
            if r is not None:
                box[0] = r if box[0] is None else box[0] + r
            if g is not None:
                box[1] = g if box[1] is None else box[1] + g

        send(plan.output_node, *((start, None) if kind == "R" else (None, start)))
        differentiating = torch.is_grad_enabled()
        for step in reversed(plan.steps):
            box = msgs.pop(step.node, None)
            if step.node in watched:
                value = _hp(env[step.node])
                recorded[step.node] = value.new_zeros((k, *value.shape)) if box is None else self._total(*box, value)
            if box is None:
                continue
            r, g = box
            if step.kind == INPUT:
                return self._total(r, g, _hp(env[step.node]))
            handler = getattr(self, f"_rule_{step.kind}", None)
            if handler is None:
                raise ModelError(f"no LRP rule for {step.name}")
            handler(step, r, g, env, side, send, k, differentiating)
        return None

    @staticmethod
    def _total(r: torch.Tensor | None, g: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """Relevance at an activation y from a relevance R and a gradient message G: R + y ⊙ G."""
        if g is None:
            return r
        return y * g if r is None else r + y * g

    # Each rule: (step, R, G, env, side, send, K, differentiating) -> messages to the inputs.
    def _rule_noop(self, step, r, g, env, side, send, k, differentiating) -> None:
        return None

    def _rule_act(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Element-wise activation: R_in = R_out (the ε-rule of the next linear layer already
        restricts relevance to active units); a gradient message becomes relevance first."""
        r = self._total(r, g, _hp(env[step.node]))
        src = step.tensor_inputs[0]
        send(src, r=r.reshape(k, *env[src].shape))

    def _rule_pass(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Shape-only ops move relevance (and gradient messages) back to the input's shape."""
        src = step.tensor_inputs[0]
        reshape_only = isinstance(step.module, _RESHAPE_MODULES) or (
            step.module is None and (step.node.op == "call_method" or step.node.target in _RESHAPE_FUNCS)
        )
        if g is not None and not reshape_only:
            r, g = self._total(r, g, _hp(env[step.node])), None
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
        r = self._total(r, g, _hp(env[step.node]))
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
        y = _hp(env[step.node])
        r = self._total(r, g, y)
        s = self._divide(step, r, y, env, differentiating)
        for arg, sign in zip(step.node.args, signs, strict=False):
            if isinstance(arg, fx.Node) and isinstance(env[arg], torch.Tensor):
                xi = _hp(env[arg])
                share = xi * s if sign > 0 else -xi * s
                send(arg, r=rules.sum_to(share, (k, *xi.shape)))

    def _rule_mul(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Multiplicative gating x ⊙ gate: all relevance goes to x, the gate is held constant.

        The gate is the operand computed by a sigmoid-like op (squeeze-excitation); otherwise the
        broadcast (smaller) operand. Products of two same-sized feature maps are refused.
        """
        r = self._total(r, g, _hp(env[step.node]))
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
        send(target, r=rules.sum_to(r, (k, *env[target].shape)))

    def _rule_div(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Division by a constant or a gate: relevance passes to the numerator."""
        num = step.node.args[0]
        if isinstance(num, fx.Node):
            r = self._total(r, g, _hp(env[step.node]))
            send(num, r=rules.sum_to(r, (k, *env[num].shape)))

    def _plans_step(self, node: fx.Node) -> Step:
        return self._plan.by_node[node]

    def _divide(self, step, r, y, env, differentiating, scale_in=None, shift_in=None, scale_out=None):
        """scale_out ⊙ R / stab(z) with z = scale_in ⊙ y + shift_in (per-channel vectors, each optional).

        When differentiating: `rules.epsilon_divide`, which keeps no denominator for the backward.
        For explanations y is z itself (a stored output) and the denominator is computed cheaply
        where the structure allows (same values where R ≠ 0):
        - the output feeds a single plain ReLU: relevance is zero wherever the ReLU output a is
          zero, and a = z elsewhere, so a + ε serves;
        - a pool of ReLU outputs: z ≥ 0, so z + ε.
        """
        if differentiating:
            return rules.epsilon_divide(r, y, self.epsilon, scale_in, shift_in, scale_out)
        relu = step.relu_user if step.fused_bn is None else step.fused_bn.relu_user
        if relu is not None:
            denominator = _hp(env[relu]) + self.epsilon
        elif step.nonneg_input:
            denominator = y + self.epsilon
        else:
            denominator = rules.stabilise(y, self.epsilon)
        s = r / denominator
        return s if scale_out is None else s * rules.channel_view(scale_out, s.dim() - 1)

    def _message(self, step, r, g, y, env, differentiating, shift_in=None) -> torch.Tensor:
        """What a linear map sends back through its transpose: G + R / stab(y + shift_in) (either part
        may be absent)."""
        msg = None if r is None else self._divide(step, r, y, env, differentiating, shift_in=shift_in)
        if g is not None:
            msg = g if msg is None else msg + g
        return msg

    # -- linear maps -------------------------------------------------------
    def _fused_z(self, step, env, side, differentiating):
        """(y, z_scale, z_shift, scale, shift) of a conv/linear step and its fused BN (if any).

        The pre-activation LRP divides by is z = z_scale ⊙ y + z_shift (per-channel vectors or None),
        y the stored output; scale/shift: the fused BN's per-channel affine map, or None. For
        explanations y is z itself (the BN output when fused); when differentiating, z has the
        biases detached, as the reference (the heatmap loss sends no gradient through biases in the
        LRP pass): the same value, other gradients.
        """
        y = _hp(env[step.node])
        bias = getattr(step.module, "bias", None) if step.module is not None else None
        if step.fused_bn is None:
            if differentiating and bias is not None:
                return y, None, bias.detach() - bias, None, None
            return y, None, None, None, None
        scale, shift = rules.bn_affine(step.fused_bn.module, y, side.get(step.fused_bn.node))
        if not differentiating:
            return _hp(env[step.fused_bn.node]), None, None, scale, shift
        # z = scale ⊙ (y − b) + (scale·b + shift).detach()
        full_bias = shift if bias is None else scale * bias + shift
        z_shift = full_bias.detach() if bias is None else full_bias.detach() - scale * bias
        return y, scale, z_shift, scale, shift

    def _linear_parts(self, step, env):
        """(weight, bias, apply, transpose) of a conv/linear step; `transpose` folds K into the batch."""
        module = step.module
        a = env[step.tensor_inputs[0]]
        if step.kind == CONV:
            apply = rules.conv_apply(module)

            def transpose(s, w):
                shape = (a.shape[0], w.shape[1] * module.groups, *a.shape[2:])
                return rules.conv_transpose(s, module, w, torch.Size(shape))

            return module.weight, module.bias, apply, transpose
        if module is None:  # F.linear(x, weight, bias)
            args = step.node.args
            weight = env[args[1]] if isinstance(args[1], fx.Node) else args[1]
            bias = step.node.kwargs.get("bias", args[2] if len(args) > 2 else None)
            bias = env[bias] if isinstance(bias, fx.Node) else bias
        else:
            weight, bias = module.weight, module.bias

        def apply_lin(x, w):
            return x @ w.t()

        return weight, bias, apply_lin, rules.linear_transpose

    def _rule_conv(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Conv/linear (+ fused BN): LRP-ε, LRP-zB at the first layer, or z+/αβ for explanations.

        ε: R_a = a ⊙ Wᵀ(G + R / stab(z)) where a gradient message G from downstream BN slices has
        already been divided by their own outputs (per-consumer fusion); with a fused BN,
        R_a = a ⊙ Wᵀ(scale ⊙ R / stab(z_BN)), i.e. the ε-rule of the fused layer W' = scale·W.
        """
        src = step.tensor_inputs[0]
        a = _hp(env[src])
        weight, bias, apply, transpose = self._linear_parts(step, env)
        y, z_scale, z_shift, scale, shift = self._fused_z(step, env, side, differentiating)
        use_zb = step.first and self.first_rule == "zb"
        if use_zb or self.rule != "epsilon":
            z = rules.affine(y, z_scale, z_shift)
            r_tot = self._total(r, g, z)
            if scale is None:
                w_f, b_f = weight, bias
            else:
                view = scale.view(-1, *([1] * (weight.dim() - 1)))
                w_f = weight * view
                b_f = shift if bias is None else scale * bias + shift
            if use_zb:
                out = rules.zb_input(r_tot, a, z, w_f, b_f, apply, transpose, self.low, self.high, self.epsilon)
            else:
                out = rules.alpha_beta(r_tot, a, w_f, b_f, apply, transpose, self.alpha, self.beta)
            send(src, r=out)
            return
        if scale is not None:
            r_tot = r if g is None else self._total(r, g, rules.affine(y, z_scale, z_shift))
            if weight.numel() < r_tot.numel():  # fold the BN scale into whichever is smaller
                msg = self._divide(step, r_tot, y, env, differentiating, z_scale, z_shift)
                view = scale.view(-1, *([1] * (weight.dim() - 1)))
                send(src, r=a * transpose(msg, weight * view))
                return
            msg = self._divide(step, r_tot, y, env, differentiating, z_scale, z_shift, scale_out=scale)
        else:
            msg = self._message(step, r, g, y, env, differentiating, shift_in=z_shift)
        if differentiating and step.preact_bn is not None:
            # BN → activation → this op in one step: the relevance a ⊙ c at the activation reaches the
            # BN output unchanged, and the BN's message takes it as factor a and c, so the product
            # a ⊙ c is never kept for the backward
            bn = step.preact_bn
            c = transpose(msg, weight)
            send(bn.tensor_inputs[0], g=self._bn_message(bn, c, None, env, side, factor=a))
            return
        send(src, r=a * transpose(msg, weight))

    def _bn_message(self, bn, r, g, env, side, factor=None) -> torch.Tensor:
        """When differentiating: the gradient message scale ⊙ R / stab(z_BN) a non-fused BN sends to its
        input x, z_BN = scale ⊙ x + shift with the shift detached; R = r + z_BN ⊙ g, or factor ⊙ r."""
        x = _hp(env[bn.tensor_inputs[0]])
        scale, shift = rules.bn_affine(bn.module, x, side.get(bn.node))
        shift = shift.detach()
        if g is not None:
            r = self._total(r, g, rules.affine(x, scale, shift))
        return rules.epsilon_divide(r, x, self.epsilon, scale, shift, scale_out=scale, factor=factor)

    _rule_linear = _rule_conv

    def _rule_bn(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Batch norm. Fused into its producer: the message moves on untouched (the producer's rule
        uses the fused weights). Otherwise (after a concatenation or a pool, or alone): a gradient
        message G = scale ⊙ R / stab(z_BN) to the input, so each producer slice gets the ε-rule of
        producer∘BN with this BN's output as denominator; for a non-linear producer this is the
        per-channel linear map R_in = x ⊙ scale ⊙ R / stab(z_BN)."""
        src = step.tensor_inputs[0]
        if step.absorbed:
            send(src, r=r, g=g)
            return
        if differentiating:
            send(src, g=self._bn_message(step, r, g, env, side))
            return
        scale, _ = rules.bn_affine(step.module, _hp(env[src]), side.get(step.node))
        z = _hp(env[step.node])
        send(src, g=self._divide(step, self._total(r, g, z), z, env, False, scale_out=scale))

    def _rule_maxpool(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Max pooling, winner-take-all: R_a = a ⊙ scatter_add(G + R / stab(y)) at the argmax."""
        src = step.tensor_inputs[0]
        a = _hp(env[src])
        y = _hp(env[step.node])
        msg = self._message(step, r, g, y, env, differentiating)
        send(src, r=a * rules.maxpool_transpose(msg, side[step.node], a.shape))

    def _rule_avgpool(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Average / adaptive-average pooling and means as uniform linear maps, LRP-ε:
        R_a = a ⊙ Pᵀ(G + R / stab(y))."""
        src = step.tensor_inputs[0]
        a = _hp(env[src])
        y = _hp(env[step.node])
        msg = self._message(step, r, g, y, env, differentiating)
        node = step.node
        if step.module is not None:
            op, args, kwargs = step.module, (), {}
        else:  # the function, or the method name ("mean")
            op = node.target
            args = fx.node.map_arg(node.args[1:], env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        send(src, r=a * rules.pool_transpose(msg, op, args, kwargs, a.shape))
