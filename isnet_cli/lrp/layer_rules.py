"""LRP rules for the steps with weights or windows: conv/linear (with a fused batch norm), batch
norm, max and average pooling.

Each rule is a method `_rule_<kind>(step, R, G, env, side, send, K, differentiating)` that sends
messages to the step's inputs; `LRP` mixes these in and provides `epsilon`, `first_rule`, `low`,
`high`, `rule`, `alpha`, `beta`, `_divide` and `_message`.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from isnet_cli.lrp import rules
from isnet_cli.lrp.messages import total, upcast
from isnet_cli.lrp.nodes import CONV
from isnet_cli.lrp.transpose import conv_transpose, linear_transpose, maxpool_transpose, pool_transpose


class LayerRules:
    """Rules of the linear maps (ε, zB at the first layer, z+/αβ for explanations) and batch norms."""

    def _fused_z(self, step, env, side, differentiating):
        """(y, z_scale, z_shift, scale, shift) of a conv/linear step and its fused BN (if any).

        The pre-activation LRP divides by is z = z_scale ⊙ y + z_shift (per-channel vectors or None),
        y the stored output; scale/shift: the fused BN's per-channel affine map, or None. For
        explanations y is z itself (the BN output when fused); when differentiating, z has the
        biases detached, as the reference (the heatmap loss sends no gradient through biases in the
        LRP pass): the same value, other gradients.
        """
        y = upcast(env[step.node])
        bias = getattr(step.module, "bias", None) if step.module is not None else None
        if step.fused_bn is None:
            if differentiating and bias is not None:
                return y, None, bias.detach() - bias, None, None
            return y, None, None, None, None
        scale, shift = rules.bn_affine(step.fused_bn.module, y, side.get(step.fused_bn.node))
        if not differentiating:
            return upcast(env[step.fused_bn.node]), None, None, scale, shift
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
                return conv_transpose(s, module, w, torch.Size(shape))

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

        return weight, bias, apply_lin, linear_transpose

    def _rule_conv(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Conv/linear (+ fused BN): LRP-ε, LRP-zB at the first layer, or z+/αβ for explanations.

        ε: R_a = a ⊙ Wᵀ(G + R / stab(z)) where a gradient message G from downstream BN slices has
        already been divided by their own outputs (per-consumer fusion); with a fused BN,
        R_a = a ⊙ Wᵀ(scale ⊙ R / stab(z_BN)), i.e. the ε-rule of the fused layer W' = scale·W.
        """
        src = step.tensor_inputs[0]
        a = upcast(env[src])
        weight, bias, apply, transpose = self._linear_parts(step, env)
        y, z_scale, z_shift, scale, shift = self._fused_z(step, env, side, differentiating)
        use_zb = step.first and self.first_rule == "zb"
        if use_zb or self.rule != "epsilon":
            z = rules.affine(y, z_scale, z_shift)
            r_tot = total(r, g, z)
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
            r_tot = r if g is None else total(r, g, rules.affine(y, z_scale, z_shift))
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
        x = upcast(env[bn.tensor_inputs[0]])
        scale, shift = rules.bn_affine(bn.module, x, side.get(bn.node))
        shift = shift.detach()
        if g is not None:
            r = total(r, g, rules.affine(x, scale, shift))
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
        scale, _ = rules.bn_affine(step.module, upcast(env[src]), side.get(step.node))
        z = upcast(env[step.node])
        send(src, g=self._divide(step, total(r, g, z), z, env, False, scale_out=scale))

    def _rule_maxpool(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Max pooling, winner-take-all: R_a = a ⊙ scatter_add(G + R / stab(y)) at the argmax."""
        src = step.tensor_inputs[0]
        a = upcast(env[src])
        y = upcast(env[step.node])
        msg = self._message(step, r, g, y, env, differentiating)
        send(src, r=a * maxpool_transpose(msg, side[step.node], a.shape))

    def _rule_avgpool(self, step, r, g, env, side, send, k, differentiating) -> None:
        """Average / adaptive-average pooling and means as uniform linear maps, LRP-ε:
        R_a = a ⊙ Pᵀ(G + R / stab(y))."""
        src = step.tensor_inputs[0]
        a = upcast(env[src])
        y = upcast(env[step.node])
        msg = self._message(step, r, g, y, env, differentiating)
        node = step.node
        if step.module is not None:
            op, args, kwargs = step.module, (), {}
        else:  # the function, or the method name ("mean")
            op = node.target
            args = fx.node.map_arg(node.args[1:], env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        send(src, r=a * pool_transpose(msg, op, args, kwargs, a.shape))
