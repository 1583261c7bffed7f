"""The relevance engine: run the captured graph forward, then propagate relevance node by node.

The forward is the model's own computation (in train mode it *is* the training forward: batch norm
uses and updates batch statistics), run over the fx graph with every activation kept. The reverse
pass applies one explicit rule per node (`structure_rules`, `layer_rules`, built on the tensor
operations of `rules` and `transpose`), so the returned heatmap is differentiable in the weights and
activations with an ordinary backward.
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
from isnet_cli.lrp.layer_rules import LayerRules
from isnet_cli.lrp.messages import Message, total, upcast
from isnet_cli.lrp.names import FIRST_RULES, RULES
from isnet_cli.lrp.nodes import BN, INPUT, OUTPUT, Step
from isnet_cli.lrp.structure_rules import StructureRules
from isnet_cli.lrp.targets import initial_message


def _batch_statistics(out: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, 1/sqrt(var + eps)) that a train-mode batch norm normalised `out` with, as its autograd
    node keeps them, or None (no gradient recorded, or another BN kernel): then they are recomputed."""
    fn = getattr(out, "grad_fn", None)
    if type(fn).__name__ == "NativeBatchNormBackward0" and fn._saved_training:
        return fn._saved_result1, fn._saved_result2
    return None


class LRP(StructureRules, LayerRules):
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
                value = upcast(env[step.node])
                recorded[step.node] = value.new_zeros((k, *value.shape)) if box is None else total(*box, value)
            if box is None:
                continue
            r, g = box
            if step.kind == INPUT:
                return total(r, g, upcast(env[step.node]))
            handler = getattr(self, f"_rule_{step.kind}", None)
            if handler is None:
                raise ModelError(f"no LRP rule for {step.name}")
            handler(step, r, g, env, side, send, k, differentiating)
        return None

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
            denominator = upcast(env[relu]) + self.epsilon
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
