"""The input contract: how a file becomes a model input. Recorded in every checkpoint.

Predict, explain, evaluate, audit and export read the contract from the checkpoint and never
re-implement preprocessing: they call `isnet_cli.io.preprocess` with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

CHANNELS: tuple[int, ...] = (1, 3)
ResizeMode = Literal["letterbox", "stretch"]
WindowPolicy = Literal["dicom-window", "minmax", "percentile"]
# The registries of both, for checks and for the command line's choices.
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
WINDOW_POLICIES: tuple[str, ...] = get_args(WindowPolicy)


@dataclass(frozen=True)
class InputContract:
    """Model input = float32 (channels, size, size) in [low, high] (default [0, 1], air dark).

    - `channels`: 1 (grey: colour files are converted to luma) or 3 (RGB kept; grey files repeated).
      The bounds [low, high] hold for every channel: ImageNet normalisation is folded into the first
      convolution (`isnet_cli.backbones`), so the LRP-zB bounds are the same per channel.
    - `resize`: `letterbox` keeps the aspect ratio and pads with 0 (air), `stretch` squashes.
    - `window`: DICOM grey-level policy: the file's VOI LUT / window (`dicom-window`), the
      min-max of the pixel data (`minmax`), or the `percentiles` of the pixel data.
    - `low`/`high`: the value range of the input, also the bounds of the LRP-zB first-layer rule.
    - `roi_name`: what the masks outline ("lung" for chest X-rays; e.g. "face", "lesion"): the
      wording of audits, heatmap legends and mask columns.
    """

    size: int = 224
    channels: int = 1
    resize: ResizeMode = "letterbox"
    window: WindowPolicy = "dicom-window"
    percentiles: tuple[float, float] = (0.5, 99.5)
    low: float = 0.0
    high: float = 1.0
    roi_name: str = "lung"

    @property
    def roi_label(self) -> str:
        """The masked region in words: "lungs" for chest X-rays, "region of interest (NAME)" otherwise."""
        return roi_label(self.roi_name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputContract:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "percentiles" in kwargs:
            kwargs["percentiles"] = tuple(kwargs["percentiles"])
        return cls(**kwargs)


def roi_label(roi_name: str) -> str:
    """ "lung" -> "lungs" (the X-ray wording stays as it was); any other name -> "region of interest (NAME)"."""
    return "lungs" if roi_name == "lung" else f"region of interest ({roi_name})"
