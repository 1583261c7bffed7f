"""The segmenter: a MONAI 2-D U-Net (1 channel in, 2 classes out: background, lung), and its checkpoint.

A segmenter checkpoint is an isnet checkpoint (safetensors + JSON metadata, `isnet_cli.infer.checkpoint`)
with `task: segmentation`, `arch: monai-unet` and the U-Net's hyper-parameters under `unet`; loading
rebuilds the network from that JSON and loads plain tensors, so it never executes code from the file.
`open_segmenter` runs a checkpoint on torch or an exported `.onnx` on onnxruntime (no torch) behind one
interface; without `--model` it is the bundled demonstration segmenter (`models/lung-segmenter/`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from isnet_cli.errors import InputError
from isnet_cli.infer.checkpoint import TASK_SEGMENTATION, checkpoint_task, load_segmenter_checkpoint, resolve_model
from isnet_cli.io.contract import InputContract

if TYPE_CHECKING:
    from torch import nn

TASK = TASK_SEGMENTATION
# The bundled demonstration segmenter (models/lung-segmenter/, see its card.md); ISNET_SEGMENTER overrides it.
BUNDLED = Path(__file__).resolve().parents[2] / "models" / "lung-segmenter" / "lung-segmenter.safetensors"
BUNDLED_ENV = "ISNET_SEGMENTER"
ARCH = "monai-unet"
CLASSES = ["background", "lung"]


def segmenter_meta(unet: dict[str, Any], contract: InputContract, row: dict[str, Any], data: dict[str, Any]) -> dict:
    """The checkpoint metadata of a segmenter after the epoch of metrics `row`."""
    return {
        "task": TASK,
        "arch": ARCH,
        "num_classes": len(CLASSES),
        "classes": CLASSES,
        "in_channels": 1,
        "unet": unet,
        "contract": contract.to_dict(),
        "metrics": row,
        "data": data,
        "epoch": row.get("epoch"),
    }


def default_segmenter(runs_dir: str | Path = "runs") -> Path:
    """The segmenter used when none is named: $ISNET_SEGMENTER, else the bundled one, else (an install
    without models/) the newest segmenter run under `runs_dir`."""
    if os.environ.get(BUNDLED_ENV):
        return resolve_model(os.environ[BUNDLED_ENV])
    if BUNDLED.is_file():
        return BUNDLED
    return resolve_model(None, runs_dir=runs_dir, task=TASK)


def load_segmenter(model: str | Path | None, device: Any = "cpu") -> tuple[nn.Module, dict[str, Any], Path]:
    """`--model` (checkpoint or run folder; None = `default_segmenter()`) -> (U-Net in eval mode on
    `device`, metadata, checkpoint path).

    A classifier checkpoint or an ONNX file is refused with a one-line error.
    """
    path = default_segmenter() if model is None else resolve_model(model)
    if path.suffix.lower() == ".onnx":
        raise InputError(path, "this needs the torch checkpoint, not an ONNX export", "pass the .safetensors file")
    net, meta = load_segmenter_checkpoint(path, device)
    return net, meta, path


@dataclass
class Segmenter:
    """A loaded segmenter, on torch or on onnxruntime: `lung(x)` maps inputs (B, 1, S, S) float32,
    preprocessed by `contract`, to the lung probability (B, S, S)."""

    path: Path
    meta: dict[str, Any]
    contract: InputContract
    description: str
    lung: Callable[[np.ndarray], np.ndarray]


def open_segmenter(model: str | Path | None, device: str = "auto") -> Segmenter:
    """`--model` (checkpoint, run folder or exported .onnx; None = `default_segmenter()`) -> `Segmenter`.
    An .onnx segmenter runs on onnxruntime and never imports torch."""
    path = default_segmenter() if model is None else resolve_model(model)
    if path.suffix.lower() == ".onnx":
        return _onnx_segmenter(path, device)

    from isnet_cli.device import resolve_device

    torch_device = resolve_device(device)
    net, meta = load_segmenter_checkpoint(path, torch_device)
    return torch_segmenter(net, meta, path)


def torch_segmenter(net: nn.Module, meta: dict[str, Any], path: Path) -> Segmenter:
    """A segmenter network already in memory (eval mode, on its device), with its metadata, as a `Segmenter`
    (`path`: the file it was or will be saved to)."""
    import torch

    torch_device = next(net.parameters()).device

    def lung(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch_device))
            return torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()

    return Segmenter(path, meta, InputContract.from_dict(meta["contract"]), f"torch {torch_device}", lung)


def _onnx_segmenter(path: Path, device: str) -> Segmenter:
    """An exported segmenter (`isnet export` of a segmenter run) on onnxruntime."""
    from isnet_cli.infer.onnx_runtime import INPUT_NAME, LOGITS_NAME, make_session, read_onnx_meta

    meta = read_onnx_meta(path)
    if checkpoint_task(meta) != TASK:
        raise InputError(path, "not a segmenter (an exported classifier)", "export a run of `isnet segment train`")
    session = make_session(path, device)

    def lung(x: np.ndarray) -> np.ndarray:
        (logits,) = session.run([LOGITS_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted[:, 1] / shifted.sum(axis=1)

    provider = session.get_providers()[0].replace("ExecutionProvider", "")
    return Segmenter(path, meta, InputContract.from_dict(meta["contract"]), f"onnxruntime {provider}", lung)
