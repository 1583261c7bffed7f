"""The model behind `isnet explain`: a checkpoint (or a plain state dict) with its class names, input
contract and LRP engine, and the targets it can explain."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli.errors import InputError
from isnet_cli.infer.loading import DEFAULT_EPSILON, Checkpoint, checkpoint_path, open_checkpoint
from isnet_cli.io.contract import InputContract
from isnet_cli.lrp.names import RULES


class Explainer:
    """A loaded model with its class names, input contract and LRP engine (`rule` at conv/linear layers)."""

    def __init__(self, checkpoint: Checkpoint, rule: str, device: Any) -> None:
        if rule not in RULES:
            raise InputError(None, f"unknown rule {rule!r}", f"use one of {', '.join(RULES)}")
        self.model = checkpoint.model.eval()
        self.classes = checkpoint.classes
        self.contract = checkpoint.contract
        self.device = device
        self.lrp = checkpoint.lrp(rule)

    def resolve_target(self, target: str) -> str | int:
        """'predicted', a class name or a class index -> what the engine explains."""
        if target == "predicted":
            return target
        if target in self.classes:
            return self.classes.index(target)
        if re.fullmatch(r"\d+", target) and int(target) < len(self.classes):
            return int(target)
        raise InputError(
            None,
            f"--target {target!r} is not 'predicted', a class name or an index",
            f"classes: {', '.join(self.classes)}",
        )

    def explain_array(self, x: np.ndarray, target: str | int) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (K,), relevance (C, S, S)) for one preprocessed input (C, S, S)."""
        import torch

        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(self.device)
        with torch.no_grad():
            r = self.lrp(xt, target)
            probs = torch.softmax(self.lrp.logits.float(), dim=1)
        return probs[0].cpu().numpy(), r[0].float().cpu().numpy()


def load_explainer(
    model: str | None = None,
    arch: str | None = None,
    weights: str | None = None,
    rule: str = "epsilon",
    device: str = "auto",
    runs_dir: str | Path = "runs",
) -> Explainer:
    """An `Explainer` for a checkpoint (`model`: file, run folder or None = newest run), or for a
    plain state dict (`arch` + `weights`, loaded with ``torch.load(weights_only=True)``; class names
    are the indices, the contract is the default 224 px letterbox)."""
    from isnet_cli.device import resolve_device

    dev = resolve_device(device)
    if arch is not None or weights is not None:
        if arch is None or weights is None:
            raise InputError(None, "--arch and --weights go together", "pass both, or --model for a checkpoint")
        checkpoint = _from_state_dict(arch, weights)
    else:
        path = checkpoint_path(
            model, "LRP needs the torch checkpoint, not an ONNX export", "pass the .safetensors file", runs_dir
        )
        checkpoint = open_checkpoint(path, device="cpu")
    checkpoint.model = checkpoint.model.to(dev)
    return Explainer(checkpoint, rule, dev)


def _from_state_dict(arch: str, weights: str) -> Checkpoint:
    """A `Checkpoint` for the state dict at `weights` in architecture `arch`: classes and input channels read
    from its head and first convolution, the default contract and epsilon."""
    import torch

    from isnet_cli.backbones import build_model

    path = Path(weights)
    if not path.is_file():
        raise InputError(path, "weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(path, f"cannot load a state dict ({type(exc).__name__})", "save model.state_dict()") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)] if isinstance(state, dict) else []
    convs = [v for v in tensors if v.dim() == 4]
    heads = [v for v in tensors if v.dim() == 2]
    if not convs or not heads:
        raise InputError(path, "not a classifier state dict (no conv or linear weights found)")
    num_classes, channels = int(heads[-1].shape[0]), int(convs[0].shape[1])
    net = build_model(arch, num_classes, in_channels=channels)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(path, f"weights do not match architecture '{arch}' ({first})") from exc
    classes = [str(i) for i in range(num_classes)]
    return Checkpoint(net, classes, InputContract(channels=channels), DEFAULT_EPSILON, {})
