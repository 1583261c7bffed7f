"""Loading a trained model: a checkpoint (torch) or an exported ONNX model, ready for inference.

`open_checkpoint` is the one place where a checkpoint becomes a model with its class names, its input
contract and its LRP settings (the epsilon it was trained with; the zB bounds are the contract's value
range): predict, explain and export all go through it. `load_backend` gives predict, evaluate and
audit either kind of model behind one interface (`Backend`); an `.onnx` model never imports torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from isnet_cli.errors import InputError
from isnet_cli.infer.checkpoint import TASK_CLASSIFICATION, resolve_model
from isnet_cli.infer.onnx_runtime import OnnxModel, model_id
from isnet_cli.io.contract import InputContract

if TYPE_CHECKING:
    from torch import nn

# LRP epsilon of a model whose metadata records none (a plain state dict trained elsewhere).
DEFAULT_EPSILON = 0.01


@dataclass
class Checkpoint:
    """A torch model with what using it needs: class names, input contract, LRP epsilon, metadata."""

    model: nn.Module
    classes: list[str]
    contract: InputContract
    epsilon: float
    meta: dict[str, Any]

    def lrp(self, rule: str = "epsilon") -> Any:
        """The LRP engine for this model: its epsilon, zB bounds from the contract's value range. For the
        segmenter-then-classifier pipeline: the classifier's relevance on the masked image."""
        from isnet_cli.lrp import LRP
        from isnet_cli.pipeline import MaskedPipeline

        if isinstance(self.model, MaskedPipeline):
            classifier = self.model.classifier
            inner = LRP(classifier, epsilon=self.epsilon, low=self.contract.low, high=self.contract.high, rule=rule)
            return MaskedLRP(self.model, inner)
        return LRP(self.model, epsilon=self.epsilon, low=self.contract.low, high=self.contract.high, rule=rule)


class MaskedLRP:
    """LRP of a `MaskedPipeline`: the segmenter's mask is applied, then the classifier is explained (the
    mask is a gate, not evidence: relevance outside it is 0 by construction, as the classifier saw air)."""

    def __init__(self, pipeline: Any, lrp: Any) -> None:
        self.pipeline, self.inner = pipeline, lrp

    def __call__(self, x: Any, target: Any = "predicted") -> Any:
        import torch

        with torch.no_grad():
            masked = self.pipeline.masked_input(x)
        return self.inner(masked, target)

    @property
    def logits(self) -> Any:
        return self.inner.logits


def open_checkpoint(path: str | Path, device: str = "cpu") -> Checkpoint:
    """Checkpoint file -> `Checkpoint` (the model on `device`, in eval mode)."""
    from isnet_cli.infer.checkpoint import load_checkpoint

    model, meta = load_checkpoint(path, device=device)
    epsilon = float((meta.get("isnet") or {}).get("eps", DEFAULT_EPSILON))
    return Checkpoint(model, list(meta["classes"]), InputContract.from_dict(meta["contract"]), epsilon, meta)


def checkpoint_path(model: str | Path | None, onnx_problem: str, onnx_fix: str, runs_dir: str | Path = "runs") -> Path:
    """Resolve `--model` for a command that needs the torch checkpoint; an `.onnx` file is refused with
    the command's own reason (`onnx_problem`) and fix."""
    path = Path(resolve_model(None if model is None else str(model), runs_dir=runs_dir, task=TASK_CLASSIFICATION))
    if path.suffix.lower() == ".onnx":
        raise InputError(path, onnx_problem, onnx_fix)
    return path


class Backend(Protocol):
    """What predict/evaluate/audit need from a model, whatever runs it."""

    path: Path
    meta: dict[str, Any]
    classes: list[str]
    contract: InputContract
    model_id: str

    @property
    def description(self) -> str: ...

    @property
    def has_relevance(self) -> bool: ...

    def logits(self, x: np.ndarray) -> np.ndarray: ...

    def relevance(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class TorchModel:
    """A checkpoint on torch; `relevance` runs the LRP engine on the predicted class."""

    def __init__(self, path: Path, device: str = "auto") -> None:
        import torch

        from isnet_cli.device import resolve_device

        self.torch = torch
        self.path = path
        self.device = resolve_device(device)
        self.checkpoint = open_checkpoint(path, device=str(self.device))
        self.model, self.meta = self.checkpoint.model, self.checkpoint.meta
        self.classes = self.checkpoint.classes
        self.contract = self.checkpoint.contract
        self.model_id = model_id(path)
        self._lrp: Any = None

    @property
    def description(self) -> str:
        return f"{self.path.name} ({self.meta.get('arch', '?')}, torch {self.device})"

    @property
    def has_relevance(self) -> bool:
        return True

    def logits(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(self.torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device))
        return out.float().cpu().numpy()

    def relevance(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """LRP relevance (B, C, S, S) of the predicted class, with the epsilon and input bounds of the model."""
        if self._lrp is None:
            self._lrp = self.checkpoint.lrp()
        xt = self.torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        with self.torch.no_grad():
            r = self._lrp(xt, "predicted")
        return self._lrp.logits.detach().float().cpu().numpy(), r.detach().float().cpu().numpy()


def load_backend(model: str | Path | None, device: str = "auto", runs_dir: str | Path = "runs") -> Backend:
    """Resolve `--model` (checkpoint, run folder, .onnx, or None = newest run) and load it.

    An `.onnx` model runs on onnxruntime and never imports torch.
    """
    path = Path(resolve_model(None if model is None else str(model), runs_dir=runs_dir, task=TASK_CLASSIFICATION))
    if path.suffix.lower() == ".onnx":
        return OnnxModel(path, device=device)
    return TorchModel(path, device=device)


def pipeline_stages(path: str | Path, repeats: int = 10) -> list[dict[str, Any]]:
    """Parameters and measured latency (CPU, one image at the contract's size, median of `repeats` runs
    after a warm-up) of each stage of a `--variant masked` checkpoint: the segmenter (its input resize and
    mask included) and the classifier. Measured when asked: latency depends on the machine."""
    import torch

    from isnet_cli.pipeline import parameter_count

    checkpoint = open_checkpoint(path)
    pipeline = checkpoint.model
    c = checkpoint.contract
    x = torch.rand(1, c.channels, c.size, c.size) * (c.high - c.low) + c.low

    def median_ms(fn: Any) -> float:
        with torch.inference_mode():
            return median_seconds(fn, repeats) * 1e3

    with torch.inference_mode():
        masked = pipeline.masked_input(x)
    return [
        {
            "stage": "segmenter",
            "parameters": parameter_count(pipeline.segmenter),
            "latency_ms": median_ms(lambda: pipeline.lung_mask(x)),
        },
        {
            "stage": "classifier",
            "parameters": parameter_count(pipeline.classifier),
            "latency_ms": median_ms(lambda: pipeline.classifier(masked)),
        },
    ]


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn` over `repeats` calls, after one warm-up call that is not timed."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
