"""Checkpoints: safetensors weights + a JSON header with everything needed to use them.

Loading never executes code from the file: weights are plain tensors and the metadata is JSON.
Reading the metadata needs neither torch nor the weights (`read_meta`), so `isnet info` and the
ONNX path stay light.
"""

from __future__ import annotations

import json
import platform
import struct
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from isnet_cli import __version__
from isnet_cli.errors import InputError
from isnet_cli.io.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from torch import nn

FORMAT = "isnet-checkpoint/1"
CHECKPOINT_SUFFIX = ".safetensors"
MODEL_SUFFIXES = (CHECKPOINT_SUFFIX, ".onnx")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")
_META_KEY = "isnet"
TASK_CLASSIFICATION = "classification"
TASK_SEGMENTATION = "segmentation"


def versions() -> dict[str, str]:
    """Versions of what produced a model (recorded in checkpoints and exports)."""
    import torch
    import torchvision

    return {
        "isnet": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Save the model's state dict and `meta` atomically.

    `meta` must hold at least `arch`, `num_classes` and `classes`; `in_channels` defaults to 1.
    `format`, `versions` and `created` are filled in.
    """
    from safetensors.torch import save

    missing = [k for k in ("arch", "num_classes", "classes") if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta lacks {missing}")
    full = {
        "format": FORMAT,
        "in_channels": 1,
        **meta,
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # clone: safetensors refuses tensors that share storage (tied or viewed parameters)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    data = save(tensors, metadata={_META_KEY: json.dumps(full)})
    atomic_write_bytes(Path(path), data)
    return Path(path)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata, read from the safetensors header only (no torch, no weights)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        meta = json.loads(header["__metadata__"][_META_KEY])
    except FileNotFoundError as exc:
        raise InputError(path, "model file not found", "pass an existing checkpoint or run folder") from exc
    except (struct.error, ValueError, KeyError, TypeError, MemoryError, OverflowError) as exc:
        raise InputError(
            path,
            "not an isnet checkpoint (no isnet metadata in a safetensors header)",
            "pass a best/last.safetensors file written by `isnet train`",
        ) from exc
    if meta.get("format") != FORMAT:
        raise InputError(path, f"unsupported checkpoint format {meta.get('format')!r}", f"expected {FORMAT}")
    return meta


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from its metadata, load the weights (strict), return it in eval mode.

    A `--variant masked` checkpoint (metadata `segmenter`) becomes the whole segmenter-then-classifier
    pipeline (`isnet_cli.pipeline.MaskedPipeline`), so every command runs both stages.
    """
    from safetensors.torch import load_file

    from isnet_cli.backbones import build_model
    from isnet_cli.io.contract import InputContract
    from isnet_cli.pipeline import MaskedPipeline, build_segmenter

    meta = read_meta(path)
    if checkpoint_task(meta) == TASK_SEGMENTATION:
        raise InputError(
            path,
            "this is a lung segmenter, not a classifier",
            "use it with `isnet segment --model`, or pass a classifier",
        )
    model = build_model(
        meta["arch"],
        meta["num_classes"],
        in_channels=meta.get("in_channels", 1),
        pretrained_layout=bool(meta.get("pretrained", False)),
    )
    segmenter = meta.get("segmenter")
    if segmenter:
        air = InputContract.from_dict(meta["contract"]).low
        model = MaskedPipeline(model, build_segmenter(segmenter), segmenter["contract"]["size"], air)
    try:
        model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    except RuntimeError as exc:
        raise InputError(path, f"weights do not match architecture '{meta['arch']}' ({exc})") from exc
    return model.to(device).eval(), meta


def load_segmenter_checkpoint(path: str | Path, device: Any = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A segmenter checkpoint (`task: segmentation`) -> (MONAI U-Net, or ensemble of them, in eval mode on
    `device`, metadata).
    Built from the JSON metadata and plain tensors: loading never executes code from the file."""
    from safetensors.torch import load_file

    from isnet_cli.pipeline import build_segmenter

    meta = read_meta(path)
    if checkpoint_task(meta) != TASK_SEGMENTATION:
        raise InputError(
            path, "not a segmenter (a classifier checkpoint)", "pass a run folder written by `isnet segment train`"
        )
    try:
        net = build_segmenter(meta, out_channels=int(meta.get("num_classes", 2)))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"its metadata does not describe a segmenter network ({exc!r})") from exc
    try:
        net.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    except RuntimeError as exc:
        raise InputError(path, f"weights do not match the recorded segmenter ({exc})") from exc
    return net.to(device).eval(), meta


def checkpoint_task(meta: dict[str, Any]) -> str:
    """What a checkpoint does: `segmentation` (a lung segmenter) or `classification` (everything else,
    including checkpoints written before segmenters existed, which record no task)."""
    return str(meta.get("task") or TASK_CLASSIFICATION)


def _newest_run(runs: Path, task: str | None) -> Path:
    """The run folder under `runs` whose files changed last, among those whose checkpoint does `task`
    (any task when None). Unreadable checkpoints are skipped: they cannot be the model meant."""
    candidates = [p for p in runs.glob(f"*/*{CHECKPOINT_SUFFIX}") if p.stem in ("best", "last")]
    folders = set()
    for p in candidates:
        try:
            if task is None or checkpoint_task(read_meta(p)) == task:
                folders.add(p.parent)
        except InputError:
            continue
    if not folders:
        kind = {TASK_SEGMENTATION: "segmenter", TASK_CLASSIFICATION: "classifier"}.get(task or "", "model")
        command = "isnet segment train" if task == TASK_SEGMENTATION else "isnet train"
        fix = f"train one with `{command} DATA`"
        raise InputError(runs, f"no trained {kind} found", f"{fix} or pass --model")
    return max(folders, key=lambda d: max(p.stat().st_mtime for p in d.iterdir()))


def resolve_model(arg: str | Path | None, runs_dir: str | Path = "runs", task: str | None = None) -> Path:
    """Turn `--model` into a model file.

    A checkpoint or `.onnx` file is used as is; a run folder gives its `best` (else `last`)
    checkpoint; no argument gives the newest run under `runs_dir` whose checkpoint does `task`
    (`classification` or `segmentation`; any when None), so a classifier command never picks up a
    segmenter trained after it, and vice versa.
    """
    if arg is None:
        return resolve_model(_newest_run(Path(runs_dir), task))
    path = Path(arg)
    if path.is_dir():
        for name in ("best", "last"):
            candidate = path / f"{name}{CHECKPOINT_SUFFIX}"
            if candidate.is_file():
                return candidate
        raise InputError(path, "run folder holds no best/last checkpoint", "pass a checkpoint file or another run")
    if not path.is_file():
        raise InputError(path, "model not found", "pass a checkpoint, a run folder or an exported .onnx")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(
            path,
            "pickled torch files are refused: unpickling can run any code the file's author chose",
            "load it yourself only if you trust it, and save a safetensors checkpoint (or use --weights with audit)",
        )
    if path.suffix not in MODEL_SUFFIXES:
        raise InputError(
            path, f"unsupported model file type '{path.suffix}'", f"use one of {', '.join(MODEL_SUFFIXES)}"
        )
    return path
