"""`isnet segment ensemble`: several trained segmenters as one checkpoint (`pipeline.SegmenterEnsemble`).

The members' class probabilities are averaged; a member trained at a smaller input size sees the input
averaged down to its size, so the ensemble's input contract is the largest member's and every other field
of the members' contracts (resize, window, channels, value range) must agree. The ensemble is an ordinary
segmenter checkpoint (`task: segmentation`, weights under `members.<i>.`, each member's U-Net, input size,
file id and best-epoch metrics under `ensemble`): `isnet segment`, `isnet export`, `isnet train --masks
auto` and `--variant masked` use it like a single U-Net. The members' closing radii do not carry over
(the averaged outline is smoother than either member's): with validation images the radius is chosen
again by the rule of `isnet_cli.segment.closing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isnet_cli.errors import InputError
from isnet_cli.io.contract import InputContract
from isnet_cli.segment.closing import RECORD_KEY, ClosingChoice, choose_closing
from isnet_cli.segment.model import CLASSES, TASK, torch_segmenter

ARCH = "monai-unet-ensemble"


@dataclass(frozen=True)
class EnsembleResult:
    """The file written, its input size and the closing chosen (None without validation images)."""

    path: Path
    size: int
    closing: ClosingChoice | None


def _member_contract(path: Path, meta: dict[str, Any]) -> InputContract:
    if "unet" not in meta:
        raise InputError(path, "is itself an ensemble", "combine the U-Nets it was made from")
    return InputContract.from_dict(meta["contract"])


def _member_name(path: Path) -> str:
    """A member's name in the metadata: its run folder and file (`lungs-128/best.safetensors`), not the
    absolute path of the machine it was combined on."""
    return f"{path.parent.name}/{path.name}"


def combine_segmenters(members: list[str], out: Path, val: str | None = None, device: str = "cpu") -> EnsembleResult:
    """Write the ensemble of the segmenter checkpoints (or run folders) `members` to `out`; with `val` (images
    with masks) choose and record its closing radius on them."""
    from isnet_cli.device import resolve_device
    from isnet_cli.infer.checkpoint import load_segmenter_checkpoint, resolve_model, save_checkpoint
    from isnet_cli.infer.onnx_runtime import model_id
    from isnet_cli.io.dataset import read_dataset
    from isnet_cli.pipeline import SegmenterEnsemble

    if len(members) < 2:
        raise InputError(None, "an ensemble needs at least two segmenters", "pass two or more MODEL arguments")
    paths = [resolve_model(m) for m in members]
    if any(p.resolve() == out.resolve() for p in paths):
        raise InputError(out, "is one of the members", "write the ensemble to a new file")
    if any(p.suffix.lower() == ".onnx" for p in paths):
        onnx = next(p for p in paths if p.suffix.lower() == ".onnx")
        raise InputError(onnx, "an ONNX export cannot be combined", "pass the segmenter's .safetensors or run folder")
    loaded = [load_segmenter_checkpoint(p, "cpu") for p in paths]
    contracts = [_member_contract(p, meta) for p, (_, meta) in zip(paths, loaded, strict=True)]
    size = max(c.size for c in contracts)
    reference = next(c for c in contracts if c.size == size).to_dict()
    for path, contract in zip(paths, contracts, strict=True):
        differs = sorted(k for k, v in contract.to_dict().items() if k != "size" and v != reference[k])
        if differs:
            raise InputError(
                path,
                f"its input contract differs from the others' in {', '.join(differs)}",
                "combine segmenters trained with the same --resize and --window",
            )
        if size % contract.size:
            raise InputError(
                path,
                f"its input size {contract.size} does not divide the largest member's {size}",
                "combine segmenters whose sizes divide one another (e.g. 128 and 256)",
            )
    ensemble = SegmenterEnsemble([net for net, _ in loaded], [c.size for c in contracts], size)
    meta = {
        "task": TASK,
        "arch": ARCH,
        "num_classes": len(CLASSES),
        "classes": CLASSES,
        "in_channels": 1,
        "ensemble": [
            {
                "unet": m["unet"],
                "input_size": c.size,
                "source": _member_name(p),
                "id": model_id(p),
                "metrics": m.get("metrics"),
            }
            for p, (_, m), c in zip(paths, loaded, contracts, strict=True)
        ],
        "contract": reference,
        "data": {"members": [m.get("data") for _, m in loaded]},
    }
    samples = read_dataset(val, require_labels=False).samples if val else []
    if val and not any(s.mask is not None for s in samples):
        raise InputError(val, "has no masks to choose the closing radius on", "pass validation images with masks")
    choice = None
    if samples:  # chosen on the ensemble in memory, then saved once with the record
        choice = choose_closing(torch_segmenter(ensemble.to(resolve_device(device)).eval(), meta, out), samples)
        meta[RECORD_KEY] = choice.record()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, ensemble, meta)
    return EnsembleResult(out, size, choice)
