"""The segmenter: a MONAI 2-D U-Net (1 channel in, 2 classes out: background, lung), and its checkpoint.

A segmenter checkpoint is an isnet checkpoint (safetensors + JSON metadata, `isnet_cli.infer.checkpoint`)
with `task: segmentation`, `arch: monai-unet` and the U-Net's hyper-parameters under `unet`; loading
rebuilds the network from that JSON and loads plain tensors, so it never executes code from the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from isnet_cli.errors import InputError
from isnet_cli.infer.checkpoint import TASK_SEGMENTATION, load_segmenter_checkpoint, resolve_model
from isnet_cli.io.contract import InputContract

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
        raise InputError(path, "ONNX segmenters are not supported yet", "pass the checkpoint or its run folder")
    net, meta = load_segmenter_checkpoint(path, device)
    return net, meta, path
