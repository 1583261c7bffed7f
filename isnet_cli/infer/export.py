"""Export a checkpoint for deployment: ONNX (onnxruntime) or TorchScript, verified before it is written.

The exported graph is the plain classifier (no LRP), input `input` float32 (batch, C, S, S) with a
dynamic batch axis, output `logits` (batch, K). A `--variant masked` checkpoint exports as one graph with
both stages (segmenter, mask, classifier: `isnet_cli.pipeline`); a lung segmenter (`isnet segment train`)
exports its U-Net, output `logits` (batch, 2, S, S), which `isnet segment --model FILE.onnx` runs.
The checkpoint metadata (classes, input contract, ISNet settings, metrics, versions) plus an `export`
block goes into the ONNX `metadata_props` (`isnet.meta`, plus flat `classes`, `input_contract`, `arch`,
`opset` keys for model viewers) and into the sidecar `FILE.json` (see `onnx_runtime.sidecar_path`).
`--with-heatmap` also writes `<stem>.heatmap.onnx` with outputs `logits` and `relevance` (LRP of the predicted class).

Files are exported to a temporary name, verified on onnxruntime against torch, then renamed: a
failed verification leaves nothing behind that looks deployable.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from isnet_cli.errors import InputError, IsnetError, ModelError
from isnet_cli.infer.checkpoint import (
    TASK_SEGMENTATION,
    checkpoint_task,
    load_segmenter_checkpoint,
    read_meta,
    versions,
)
from isnet_cli.infer.loading import Checkpoint, checkpoint_path, open_checkpoint
from isnet_cli.infer.onnx_runtime import INPUT_NAME, LOGITS_NAME, META_KEY, RELEVANCE_NAME, make_session, sidecar_path
from isnet_cli.io.atomic import atomic_write_bytes
from isnet_cli.io.cache import file_digest
from isnet_cli.io.contract import InputContract
from isnet_cli.pipeline import export_form

DEFAULT_OPSET = 17
DYNAMO_MIN_OPSET = 18  # the dynamo exporter emits opset 18 and cannot down-convert (Reduce* axes inputs)
LOGIT_TOLERANCE = 1e-4  # max |logit_onnx - logit_torch|
HEATMAP_TOLERANCE = 1e-3  # max |R_onnx - R_torch| / max |R_torch|
EXPORT_FORMATS = ("onnx", "torchscript")


class VerificationError(IsnetError):
    """The exported file does not reproduce the torch model within tolerance (exit 1)."""


class HeatmapGraph(nn.Module):
    """`x -> (logits, R)`: the classifier and the LRP relevance (B, C, S, S) of its predicted class."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__()
        self.model = checkpoint.model
        self.lrp = checkpoint.lrp()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        relevance = self.lrp(x, "predicted")
        return self.lrp.logits, relevance


def example_inputs(contract: InputContract, batch: int, seed: int = 0) -> torch.Tensor:
    """Uniform noise in [low, high]: exercises every channel and the whole value range."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, contract.channels, contract.size, contract.size)
    return contract.low + (contract.high - contract.low) * torch.rand(shape, generator=g)


def _onnx_bytes(module: nn.Module, example: torch.Tensor, outputs: list[str], opset: int, dynamo: bool) -> bytes:
    """Serialise `module` to ONNX with a dynamic batch axis on the input and every output."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # shape arithmetic is constant for a fixed input size; the batch axis is checked by verification
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # the TorchScript-based exporter is chosen on purpose (<1 s vs ~15 s, same numbers)
        warnings.simplefilter("ignore", DeprecationWarning)
        # MONAI's U-Net normalises each image by its own statistics: exported as such, which is right
        warnings.filterwarnings("ignore", message=".*instance_norm.*", category=UserWarning)
        target = Path(tmp) / "model.onnx"
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            # the dynamo exporter reports progress on stdout, which belongs to --json output
            with contextlib.redirect_stdout(sys.stderr):
                program = torch.onnx.export(
                    module,
                    (example,),
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=outputs,
                    opset_version=opset,
                    dynamic_shapes=({0: batch},),
                    external_data=False,
                )
            program.save(str(target), external_data=False)
        else:
            axes = {name: {0: "batch"} for name in [INPUT_NAME, *outputs]}
            torch.onnx.export(
                module,
                (example,),
                str(target),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=outputs,
                opset_version=opset,
                dynamic_axes=axes,
                external_data=False,
            )
        return target.read_bytes()


def export_error(what: str, exc: Exception) -> ModelError:
    """One-line error for a failed export (the TorchScript exporter appends the whole traced graph)."""
    reason = (str(exc).strip().splitlines() or [""])[0][:300]
    return ModelError(f"cannot export {what} to ONNX ({type(exc).__name__}: {reason})")


def _with_metadata(data: bytes, meta: dict[str, Any]) -> bytes:
    """Embed `meta` in the model's metadata_props (full JSON under `isnet.meta`, plus flat keys)."""
    import onnx

    proto = onnx.load_from_string(data)
    props = {
        META_KEY: json.dumps(meta),
        "classes": json.dumps(meta["classes"]),
        "input_contract": json.dumps(meta["contract"]),
        "arch": str(meta.get("arch", "")),
        "opset": str(meta["export"]["opset"]),
    }
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    kind = "lung segmenter" if checkpoint_task(meta) == TASK_SEGMENTATION else "classifier"
    proto.doc_string = f"isnet {kind} {meta.get('arch', '')}: classes {meta['classes']}"
    return proto.SerializeToString()


def _run_onnx(path: Path, x: torch.Tensor, outputs: list[str]) -> list[np.ndarray]:
    session = make_session(path, "cpu")
    return session.run(outputs, {INPUT_NAME: x.numpy()})


def verify_logits(path: Path, model: nn.Module, examples: list[torch.Tensor], tolerance: float) -> float:
    """Max |logits_onnx - logits_torch| over `examples` (several batch sizes: proves the dynamic axis)."""
    worst = 0.0
    for x in examples:
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = _run_onnx(path, x, [LOGITS_NAME])
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > tolerance:
        raise VerificationError(f"{path.name}: onnxruntime logits differ from torch by {worst:.3g} > {tolerance:g}")
    return worst


def verify_heatmap(path: Path, graph: HeatmapGraph, examples: list[torch.Tensor], tolerance: float) -> float:
    """Max |R_onnx - R_torch| / max |R_torch| (and the logits check) over `examples`."""
    worst = 0.0
    for x in examples:
        with torch.no_grad():
            logits, relevance = graph(x)
        got_logits, got_r = _run_onnx(path, x, [LOGITS_NAME, RELEVANCE_NAME])
        if float(np.abs(got_logits - logits.numpy()).max()) > LOGIT_TOLERANCE:
            raise VerificationError(f"{path.name}: heatmap graph logits differ from torch")
        scale = float(relevance.abs().max()) or 1.0
        worst = max(worst, float(np.abs(got_r - relevance.numpy()).max()) / scale)
    if worst > tolerance:
        raise VerificationError(
            f"{path.name}: onnxruntime relevance differs from the torch LRP engine by {worst:.3g} "
            f"(relative to max |R|) > {tolerance:g}"
        )
    return worst


def export_model(
    model: str | Path | None,
    out: str | Path,
    fmt: str = "onnx",
    opset: int = DEFAULT_OPSET,
    dynamo: bool = False,
    verify: bool = True,
    with_heatmap: bool = False,
) -> dict[str, Any]:
    """Export the checkpoint `model` to `out`; returns the sidecar metadata that was written.

    Verification runs the exported file on example batches of 1 and 3 and compares with torch.
    """
    source = checkpoint_path(model, "is already an exported model", "export from a checkpoint or a run folder")
    out = Path(out)
    if fmt not in EXPORT_FORMATS:
        raise InputError(None, f"unknown export format {fmt!r}", f"use {' or '.join(EXPORT_FORMATS)}")
    if fmt == "onnx" and out.suffix.lower() != ".onnx":
        raise InputError(out, "ONNX output must end in .onnx")
    if with_heatmap and fmt != "onnx":
        raise InputError(None, "--with-heatmap needs --format onnx")
    checkpoint = _open_for_export(source, with_heatmap)
    examples = [example_inputs(checkpoint.contract, 3, seed=0), example_inputs(checkpoint.contract, 1, seed=1)]
    export_meta = _export_record(fmt, out, source, checkpoint.contract)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        _export_onnx(checkpoint, out, export_meta, opset, dynamo, verify, with_heatmap, examples)
    else:
        export_meta["exporter"] = "torch.jit.trace"
        _export_torchscript(checkpoint.model, examples, out, {**checkpoint.meta, "export": export_meta}, verify)
    full = {**checkpoint.meta, "export": export_meta}
    atomic_write_bytes(sidecar_path(out), (json.dumps(full, indent=2) + "\n").encode())
    return full


def _open_for_export(source: Path, with_heatmap: bool) -> Checkpoint:
    """The checkpoint to export: a classifier (a `--variant masked` one with its segmenter inside), or a
    lung segmenter, whose graph maps `input` (B, 1, S, S) to `logits` (B, 2, S, S) (background, lung)."""
    meta = read_meta(source)
    if checkpoint_task(meta) != TASK_SEGMENTATION:
        return open_checkpoint(source, device="cpu")
    if with_heatmap:
        raise InputError(source, "--with-heatmap explains classifiers; this is a segmenter", "drop --with-heatmap")
    net, meta = load_segmenter_checkpoint(source)
    return Checkpoint(net, list(meta["classes"]), InputContract.from_dict(meta["contract"]), 0.0, meta)


def _graph_module(checkpoint: Checkpoint, export_meta: dict[str, Any]) -> nn.Module:
    """What goes into the ONNX graph: a segmenter's U-Net in `export_form` (the same function in layers
    onnxruntime runs faster on CPU; verification still compares with the checkpoint's own U-Net), else the
    checkpoint's model."""
    if checkpoint_task(checkpoint.meta) != TASK_SEGMENTATION:
        return checkpoint.model
    export_meta["graph"] = "export_form: PReLU as LeakyReLU, transposed convolutions as Conv + DepthToSpace"
    return export_form(checkpoint.model)


def _export_record(fmt: str, out: Path, source: Path, contract: InputContract) -> dict[str, Any]:
    """The `export` block of the metadata, before the export itself fills in opset, exporter, verification."""
    return {
        "format": fmt,
        "file": out.name,
        "input": {"name": INPUT_NAME, "shape": ["batch", contract.channels, contract.size, contract.size]},
        "outputs": [LOGITS_NAME],
        "dynamic_batch": True,
        "source": {"file": source.name, "sha256": file_digest(source)},
        "versions": {**versions(), **_export_versions()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "heatmap": None,
        "verified": None,
    }


def _export_onnx(
    checkpoint: Checkpoint,
    out: Path,
    export_meta: dict[str, Any],
    opset: int,
    dynamo: bool,
    verify: bool,
    with_heatmap: bool,
    examples: list[torch.Tensor],
) -> None:
    """Write `out` (and with `with_heatmap` the heatmap graph), verified; nothing is left behind on failure."""
    if dynamo:
        opset = max(opset, DYNAMO_MIN_OPSET)
    export_meta.update(opset=opset, exporter="dynamo" if dynamo else "torchscript")
    written: list[Path] = []
    try:
        if with_heatmap:
            export_meta["heatmap"] = _export_heatmap(checkpoint, out, opset, dynamo, verify, examples)
            written.append(out.with_name(export_meta["heatmap"]["file"]))
        try:
            data = _onnx_bytes(_graph_module(checkpoint, export_meta), examples[0], [LOGITS_NAME], opset, dynamo)
        except Exception as exc:
            raise export_error("the classifier", exc) from exc
        tmp = out.with_name(f".{out.name}.tmp")
        written.append(tmp)
        tmp.write_bytes(data)
        if verify:
            export_meta["verified"] = {
                "runtime": "onnxruntime CPU",
                "batches": [int(x.shape[0]) for x in examples],
                "max_abs_diff": verify_logits(tmp, checkpoint.model, examples, LOGIT_TOLERANCE),
                "tolerance": LOGIT_TOLERANCE,
            }
        # metadata last, so that the embedded copy equals the sidecar (verification result included)
        tmp.write_bytes(_with_metadata(data, {**checkpoint.meta, "export": export_meta}))
        os.replace(tmp, out)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _export_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _export_heatmap(
    checkpoint: Checkpoint, out: Path, opset: int, dynamo: bool, verify: bool, examples: list[torch.Tensor]
) -> dict[str, Any]:
    """Write `<stem>.heatmap.onnx` (outputs logits, relevance) and return its `export.heatmap` block."""
    graph = HeatmapGraph(checkpoint).eval()
    target = out.with_name(f"{out.stem}.heatmap.onnx")
    try:
        data = _onnx_bytes(graph, examples[0], [LOGITS_NAME, RELEVANCE_NAME], opset, dynamo)
    except Exception as exc:
        raise export_error("the LRP heatmap graph", exc) from exc
    contract = checkpoint.contract
    block: dict[str, Any] = {
        "file": target.name,
        "outputs": [LOGITS_NAME, RELEVANCE_NAME],
        "target": "predicted",
        "rules": {"epsilon": checkpoint.epsilon, "first_rule": "zb", "low": contract.low, "high": contract.high},
        "verified": None,
    }
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(_with_metadata(data, {**checkpoint.meta, "export": {"opset": opset, "heatmap_graph": True}}))
    try:
        if verify:
            block["verified"] = {
                "max_rel_diff": verify_heatmap(tmp, graph, examples, HEATMAP_TOLERANCE),
                "tolerance": HEATMAP_TOLERANCE,
                "relative_to": "max |R| of the torch engine",
            }
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return block


def _export_torchscript(
    net: nn.Module, examples: list[torch.Tensor], out: Path, meta: dict[str, Any], verify: bool
) -> None:
    """Trace, embed the metadata as the extra file `isnet.json`, reload and compare with eager."""
    import io

    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated upstream but is still what C++/LibTorch deployments load
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(net, examples[0], check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"isnet.json": json.dumps(meta)})
        buffer.seek(0)
        loaded = torch.jit.load(buffer, map_location="cpu") if verify else None
    if loaded is not None:
        worst = 0.0
        for x in examples:
            with torch.no_grad():
                worst = max(worst, float((loaded(x) - net(x)).abs().max()))
        if worst > LOGIT_TOLERANCE:
            raise VerificationError(f"{out.name}: TorchScript output differs from eager by {worst:.3g}")
        meta["export"]["verified"] = {
            "runtime": "torch.jit",
            "batches": [int(x.shape[0]) for x in examples],
            "max_abs_diff": worst,
            "tolerance": LOGIT_TOLERANCE,
        }
    atomic_write_bytes(out, buffer.getvalue())
