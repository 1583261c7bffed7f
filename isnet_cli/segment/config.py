"""Every option of `isnet segment train`, with its default and its check, in one torch-free place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from isnet_cli.errors import InputError
from isnet_cli.io.contract import InputContract


@dataclass
class SegmentConfig:
    """Every option of `isnet segment train` (field names = option names with `_`)."""

    data: str = ""
    val: str | None = None
    val_fraction: float = 0.2
    img_size: int = 256
    resize: str = "letterbox"
    window: str = "dicom-window"
    augment: bool = True
    channels: tuple[int, ...] = (16, 32, 64, 128)
    res_units: int = 1
    batch_size: int = 8
    epochs: int = 40
    lr: float = 1e-3
    device: str = "auto"
    seed: int = 0
    cache: str | None = None
    out: str = "runs"
    name: str | None = None
    contours: int = 6
    amp: bool = False
    devices: int = 1
    no_progress: bool = False

    # Fields that only say how/where to run, not what is trained: `--resume` may change them.
    RUNTIME = ("device", "devices", "no_progress", "epochs", "cache")

    @property
    def downsampling(self) -> int:
        """The U-Net halves the resolution once per level below the first: 2^(levels - 1)."""
        return 2 ** (len(self.channels) - 1)

    def validate(self) -> None:
        """Check ranges; raise InputError naming the option."""
        checks = [
            ("img-size", self.img_size >= 16 and self.img_size % self.downsampling == 0,
             f"at least 16 and a multiple of {self.downsampling} (the U-Net's downsampling)"),
            ("batch-size", self.batch_size >= 2, "at least 2 (batch norm needs two samples)"),
            ("epochs", self.epochs >= 1, "at least 1"),
            ("lr", self.lr > 0, "a positive number"),
            ("val-fraction", 0.0 < self.val_fraction < 1.0, "a number in (0, 1)"),
            ("channels", len(self.channels) >= 2 and min(self.channels) >= 1, "two or more positive widths"),
            ("res-units", self.res_units >= 0, "0 or more"),
            ("contours", self.contours >= 0, "0 or more"),
            ("devices", self.devices >= 1, "at least 1"),
        ]  # fmt: skip
        for name, ok, expected in checks:
            if not ok:
                raise InputError(None, f"--{name}: invalid value {getattr(self, name.replace('-', '_'))!r}", expected)
        if not self.data:
            raise InputError(None, "no training data given", "pass DATA (a manifest CSV or folder with masks)")

    def contract(self) -> InputContract:
        """The input contract of the trained segmenter (recorded in its checkpoints)."""
        return InputContract(size=self.img_size, channels=1, resize=self.resize, window=self.window)

    def unet(self) -> dict[str, Any]:
        """The U-Net's hyper-parameters, as recorded in the checkpoint (see `isnet_cli.segment.model`)."""
        return {
            "channels": list(self.channels),
            "strides": [2] * (len(self.channels) - 1),
            "num_res_units": self.res_units,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmentConfig:
        """The config `record` wrote (config.json of a run); unknown keys are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            fix = f"known: {', '.join(sorted(known))}"
            raise InputError(None, f"unknown segment training option(s) {unknown}", fix)
        return cls(**{**data, "channels": tuple(data.get("channels", cls.channels))})

    def record(self) -> dict[str, Any]:
        """config.json: every option as run."""
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        return d
