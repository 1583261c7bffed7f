"""The input contract: how a file becomes a model input. Recorded in every checkpoint.

Predict, explain, evaluate, audit and export read the contract from the checkpoint and never
re-implement preprocessing: they call `isnet_cli.io.preprocess` with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

ResizeMode = Literal["letterbox", "stretch"]
WindowPolicy = Literal["dicom-window", "minmax", "percentile"]
# The registries of both, for checks and for the command line's choices.
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
WINDOW_POLICIES: tuple[str, ...] = get_args(WindowPolicy)


@dataclass(frozen=True)
class InputContract:
    """Model input = float32 (channels, size, size) in [low, high] (default [0, 1], air dark).

    - `resize`: `letterbox` keeps the aspect ratio and pads with 0 (air), `stretch` squashes.
    - `window`: DICOM grey-level policy: the file's VOI LUT / window (`dicom-window`), the
      min-max of the pixel data (`minmax`), or the `percentiles` of the pixel data.
    - `low`/`high`: the value range of the input, also the bounds of the LRP-zB first-layer rule.
    """

    size: int = 224
    channels: int = 1
    resize: ResizeMode = "letterbox"
    window: WindowPolicy = "dicom-window"
    percentiles: tuple[float, float] = (0.5, 99.5)
    low: float = 0.0
    high: float = 1.0

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
