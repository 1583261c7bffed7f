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
    """Rebuild the model from its metadata, load the weights (strict), return it in eval mode."""
    from safetensors.torch import load_file

    from isnet_cli.backbones import build_model

    meta = read_meta(path)
    if meta.get("task") == "segmentation":
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
    try:
        model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    except RuntimeError as exc:
        raise InputError(path, f"weights do not match architecture '{meta['arch']}' ({exc})") from exc
    return model.to(device).eval(), meta


def resolve_model(arg: str | Path | None, runs_dir: str | Path = "runs") -> Path:
    """Turn `--model` into a model file.

    A checkpoint or `.onnx` file is used as is; a run folder gives its `best` (else `last`)
    checkpoint; no argument gives the newest run under `runs_dir`.
    """
    if arg is None:
        runs = Path(runs_dir)
        candidates = [p for p in runs.glob(f"*/*{CHECKPOINT_SUFFIX}") if p.stem in ("best", "last")]
        if not candidates:
            raise InputError(runs, "no trained model found", "train one with `isnet train DATA` or pass --model")
        newest_run = max({p.parent for p in candidates}, key=lambda d: max(p.stat().st_mtime for p in d.iterdir()))
        return resolve_model(newest_run)
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
