"""Torch-free inference on an exported ONNX model (onnxruntime + numpy only).

An exported model is `model.onnx` plus its sidecar `model.onnx.json` (the file name with `.json`
appended). The sidecar holds the checkpoint metadata (classes, input contract, ISNet settings,
metrics, versions) and an `export` block (opset, exporter, verification result, heatmap graph). The
same metadata is embedded in the ONNX `metadata_props` under `isnet.meta`, so a model whose sidecar
was lost still loads.

This module must never import torch: `isnet predict --model m.onnx` relies on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli.errors import ModelError
from isnet_cli.io.cache import file_digest
from isnet_cli.io.contract import InputContract

META_KEY = "isnet.meta"
INPUT_NAME = "input"
LOGITS_NAME = "logits"
RELEVANCE_NAME = "relevance"


def sidecar_path(onnx_path: str | Path) -> Path:
    """`model.onnx` -> `model.onnx.json` (appending keeps it unique next to other exports of the same stem)."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def model_id(path: str | Path) -> str:
    """Short model id: the first 12 hex digits of the model file's sha256."""
    return file_digest(path)[:12]


def ort_providers(device: str = "auto") -> list[str]:
    """Execution providers for `device`: `auto` = CUDA when onnxruntime offers it, then CPU; `cpu`; `cuda[:N]`."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise ModelError(f"--device {device}: onnxruntime has no CUDAExecutionProvider here ({available})")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise ModelError(f"unknown device {device!r} for onnxruntime; use auto, cpu or cuda[:N]")
    # onnxruntime-gpu lists CUDA even without a GPU; probing it then costs time and an error message
    gpu_present = Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if gpu_present else ("CPUExecutionProvider",)
    return [p for p in wanted if p in available]


def make_session(path: str | Path, device: str = "auto", threads: int = 0) -> Any:
    """An onnxruntime InferenceSession; falls back to CPU when the CUDA provider cannot start.

    onnxruntime-gpu lists CUDAExecutionProvider even without a usable GPU; the session then runs on
    CPU and `session.get_providers()` says so, which is what callers should log.
    """
    import onnxruntime as ort

    # A CUDA provider that cannot start (missing cuDNN/CUDA libraries) falls back to CPU; the caller
    # logs the provider actually used, so onnxruntime's own error print is silenced (4 = fatal only).
    ort.set_default_logger_severity(4 if device == "auto" else 3)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    providers: list[Any] = ort_providers(device)
    if device.startswith("cuda:"):
        providers = [("CUDAExecutionProvider", {"device_id": int(device.split(":", 1)[1])}), "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise ModelError(f"{path}: onnxruntime cannot load this model ({exc})") from exc


def read_onnx_meta(path: str | Path) -> dict[str, Any]:
    """The isnet metadata of an exported model: the sidecar JSON, else the embedded `isnet.meta`."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such ONNX file")
    side = sidecar_path(path)
    if side.is_file():
        try:
            return json.loads(side.read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"{side}: sidecar is not valid JSON ({exc}); re-export the model") from exc
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    if META_KEY not in props:
        raise ModelError(
            f"{path}: no isnet metadata (sidecar {side.name} missing and no '{META_KEY}' in metadata_props); "
            "export it with 'isnet export'"
        )
    return json.loads(props[META_KEY])


# What must agree between a sidecar and the model it sits beside: a mismatch would give wrong class names.
_MATCHED_KEYS = ("arch", "num_classes", "classes", "contract")


def check_sidecar(path: Path, meta: dict[str, Any], session: Any) -> None:
    """Refuse a model whose sidecar does not describe it: the metadata embedded in the ONNX file at export
    (when there) must agree on arch, classes and input contract, and the graph must output one logit per class.
    A sidecar copied from another export, or edited, would otherwise relabel every prediction."""
    side = sidecar_path(path)
    embedded_raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    if embedded_raw is not None:
        try:
            embedded = json.loads(embedded_raw)
        except json.JSONDecodeError:
            embedded = {}
        differ = [k for k in _MATCHED_KEYS if k in embedded and embedded.get(k) != meta.get(k)]
        if differ:
            raise ModelError(
                f"{path}: sidecar {side.name} does not match the model (different {', '.join(differ)}); "
                "re-export the model, or remove the stray sidecar"
            )
    width = session.get_outputs()[0].shape[-1]
    if isinstance(width, int) and width != len(meta.get("classes", [])):
        raise ModelError(
            f"{path}: the model outputs {width} logits but its metadata names {len(meta.get('classes', []))} "
            f"classes; re-export the model"
        )


class OnnxModel:
    """An exported classifier on onnxruntime: `logits(x)` for x float32 (B, C, S, S) -> (B, K).

    When the export has a heatmap graph (`isnet export --with-heatmap`), `relevance(x)` returns
    `(logits, R)` with R the LRP relevance (B, C, S, S) of the predicted class.
    """

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        self.path = Path(path)
        self.meta = read_onnx_meta(self.path)
        self.classes: list[str] = list(self.meta["classes"])
        self.contract = InputContract.from_dict(self.meta["contract"])
        self.model_id = model_id(self.path)
        self.device = device
        self.session = make_session(self.path, device)
        check_sidecar(self.path, self.meta, self.session)
        self.provider = self.session.get_providers()[0]
        self._heatmap_session: Any = None

    @property
    def description(self) -> str:
        return f"{self.path.name} (ONNX, onnxruntime {self.provider})"

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([LOGITS_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]

    @property
    def heatmap_path(self) -> Path | None:
        heat = (self.meta.get("export") or {}).get("heatmap")
        if not heat:
            return None
        path = self.path.with_name(heat["file"])
        return path if path.is_file() else None

    def relevance(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        path = self.heatmap_path
        if path is None:
            raise ModelError(f"{self.path}: exported without a heatmap graph; re-export with --with-heatmap")
        if self._heatmap_session is None:
            self._heatmap_session = make_session(path, self.device)
        logits, relevance = self._heatmap_session.run(
            [LOGITS_NAME, RELEVANCE_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}
        )
        return logits, relevance

    @property
    def has_relevance(self) -> bool:
        return self.heatmap_path is not None
