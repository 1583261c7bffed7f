"""Every option of `isnet train`, with its default and its check, in one torch-free place.

The Click layer takes its defaults and choices from here, and `--config` files and the recorded
`config.yaml` use the same field names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isnet_cli.errors import InputError
from isnet_cli.io.contract import CHANNELS, InputContract
from isnet_cli.objective.settings import METHODS, VARIANTS, HeatmapLossParams, ObjectiveSettings, uses_heatmap_loss
from isnet_cli.objective.tuning import parse_cut

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "none")
SELECT_BY = ("loss", "accuracy", "auroc", "macro_f1")
# --masks: every image needs its own mask (given), or a segmenter fills the missing ones (auto)
MASK_SOURCES = ("given", "auto")
# Default --bg-swap of the ISNet variants: every training image gets another image's background
# (measured in benchmarks/convergence.py: 0.5 left the model using the marker a little).
ISNET_BG_SWAP = 1.0
# Default --ramp of the ISNet variants with the swap on: P rises from 0 over this many epochs, so the CE can
# keep the lesion evidence of the warm-up (started from with --warm-start, the default) while the heatmap
# loss moves relevance off the background (benchmarks/README.md, real radiographs).
ISNET_RAMP = 5
_LOSS = HeatmapLossParams()  # the heatmap loss's own defaults are the options' defaults


@dataclass
class TrainConfig:
    """Every option of `isnet train` (field names = option names with `_`; also the YAML keys)."""

    data: str = ""
    val: str | None = None
    val_fraction: float = 0.2
    ood: str | None = None
    classes: list[str] | None = None
    mask_segment: str | None = None  # the segment label where masks are DICOM SEGs (None: the lung-coded ones)
    arch: str = "densenet121"
    pretrained: bool = False
    img_size: int = 224
    channels: int | None = None  # None: auto, 3 when the training images are in colour (`detect_channels`)
    roi_name: str = "lung"
    resize: str = "letterbox"
    window: str = "dicom-window"
    augment: bool = False
    bg_swap: float | None = None  # None: ISNET_BG_SWAP with the heatmap loss, else 0 (see background_swap)
    batch_size: int = 16
    epochs: int = 30
    lr: float = 1e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    clip: float = 1.0
    variant: str = "selective"
    method: str = "isnet"
    # The reference's 0.7 left small networks in the degenerate optimum; 0.3 (with the warm start and ramp) let
    # ResNet-18 learn a real-radiograph lesion as well as without the heatmap loss (benchmarks/README.md).
    P: float = 0.3
    ramp: int | None = None  # None: ISNET_RAMP for an ISNet trained with the background swap, else 0 (see ramp_epochs)
    d: float = _LOSS.d
    E: float = _LOSS.E
    A: float = _LOSS.A
    B: float = _LOSS.B
    eps: float = 0.01
    cut: str = "auto"
    cut_epochs: int = 5
    warm_start: bool | None = None  # None: on for an ISNet with --cut auto and the swap on (see starts_from_warm_up)
    lds: bool = False
    lds_layers: str | None = None
    lds_decay: float = 1.0
    rrr_lambda: float = 10.0
    select_by: str = "loss"
    device: str = "auto"
    amp: bool = False
    seed: int = 0
    deterministic: bool = False
    workers: int = 0
    cache: str | None = None
    out: str = "runs"
    name: str | None = None
    heatmaps: int = 4
    precise_bn: bool = True
    max_bad_steps: int = 10
    devices: int = 1
    no_progress: bool = False
    masks: str = "given"
    segmenter: str | None = None  # None: the bundled lung segmenter (`isnet_cli.segment.model.default_segmenter`)
    # Set by --masks auto (not an option): segmenter path and id, the original DATA/--val, mask counts
    auto_masks: dict[str, Any] | None = None

    # Fields that only say how/where to run, not what is trained: `--resume` may change them.
    RUNTIME = ("device", "devices", "workers", "no_progress", "epochs", "cache")

    def validate(self) -> None:
        """Check choices and ranges; raise InputError naming the option."""
        checks = [
            ("variant", self.variant in VARIANTS, f"one of {', '.join(VARIANTS)}"),
            ("method", self.method in METHODS, f"one of {', '.join(METHODS)}"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            ("scheduler", self.scheduler in SCHEDULERS, f"one of {', '.join(SCHEDULERS)}"),
            ("select-by", self.select_by in SELECT_BY, f"one of {', '.join(SELECT_BY)}"),
            ("P", 0.0 <= self.P < 1.0, "a number in [0, 1)"),
            ("d", 0.0 <= self.d <= 1.0, "a number in [0, 1]"),
            ("E", self.E > 0, "a positive number"),
            ("eps", self.eps >= 0, "a non-negative number"),
            ("img-size", self.img_size >= 8, "at least 8"),
            ("channels", self.channels is None or self.channels in CHANNELS, "1 or 3 (or auto)"),
            ("roi-name", bool(self.roi_name.strip()), "a name for what the masks outline, e.g. lung or face"),
            ("batch-size", self.batch_size >= 2, "at least 2 (batch norm needs two samples)"),
            ("epochs", self.epochs >= 1, "at least 1"),
            ("lr", self.lr > 0, "a positive number"),
            ("cut-epochs", self.cut_epochs >= 1, "at least 1"),
            ("ramp", self.ramp is None or self.ramp >= 0, "0 or more epochs"),
            ("bg-swap", self.bg_swap is None or 0.0 <= self.bg_swap <= 1.0, "a probability in [0, 1]"),
            ("devices", self.devices >= 1, "at least 1"),
            ("val-fraction", 0.0 < self.val_fraction < 1.0, "a number in (0, 1)"),
            ("max-bad-steps", self.max_bad_steps >= 1, "at least 1"),
            ("lds-decay", 0.0 <= self.lds_decay <= 1.0, "a number in [0, 1]"),
            ("masks", self.masks in MASK_SOURCES, f"one of {', '.join(MASK_SOURCES)}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise InputError(None, f"--{name}: invalid value {getattr(self, name.replace('-', '_'))!r}", expected)
        try:
            parse_cut(self.cut)
        except ValueError as exc:
            raise InputError(None, str(exc), "e.g. --cut auto or --cut 1,25") from exc
        if self.lds and not self.uses_lrp_loss:
            raise InputError(None, "--lds needs the LRP heatmap loss", "drop --lds, or train an ISNet variant")
        if self.warm_start is True and (not self.uses_lrp_loss or self.cut != "auto"):
            raise InputError(
                None,
                "--warm-start continues from the C1/C2 warm-up of an ISNet (--cut auto)",
                "drop --warm-start",
            )
        if self.lds and self.cut != "auto":
            raise InputError(None, "--lds tunes C1/C2 for every layer itself", "drop --cut (use --cut auto)")
        if not self.data:
            raise InputError(
                None, "no training data given", "pass DATA (a manifest CSV or folder) or data: in --config"
            )
        if self.masked and self.method != "isnet":
            raise InputError(None, "--variant masked is a plain classifier behind a segmenter", "drop --method rrr")
        if self.segmenter and self.masks != "auto" and not self.masked:
            raise InputError(None, "--segmenter is used by --masks auto and --variant masked", "add --masks auto")

    @property
    def uses_lrp_loss(self) -> bool:
        return uses_heatmap_loss(self.method, self.variant)

    def contract(self) -> InputContract:
        """The input contract of the trained model (recorded in its checkpoints); `channels` auto (None)
        is resolved from the data before training (`isnet_cli.train.data.prepare_data`), 1 until then."""
        return InputContract(
            size=self.img_size,
            channels=self.channels or 1,
            resize=self.resize,
            window=self.window,
            roi_name=self.roi_name,
        )

    def objective_settings(self) -> ObjectiveSettings:
        """The per-batch loss's parameters; the LRP zB bounds are the contract's value range."""
        contract = self.contract()
        return ObjectiveSettings(
            variant=self.variant,
            method=self.method,
            P=self.P,
            loss=HeatmapLossParams(self.d, self.E, self.A, self.B),
            epsilon=self.eps,
            low=contract.low,
            high=contract.high,
            lds_decay=self.lds_decay,
            rrr_lambda=self.rrr_lambda,
            amp=self.amp,
        )

    @property
    def lds_layer_names(self) -> list[str] | None:
        """The --lds-layers list (None: the architecture's default)."""
        if not self.lds_layers:
            return None
        return [name.strip() for name in self.lds_layers.split(",") if name.strip()]

    @property
    def masked(self) -> bool:
        """The segmenter-then-classifier pipeline: trained on images with the background replaced by air."""
        return self.variant == "masked"

    @property
    def needs_masks(self) -> bool:
        return self.uses_lrp_loss or self.method == "rrr" or self.background_swap > 0 or self.masked

    @property
    def background_swap(self) -> float:
        """Probability of the background-swap augmentation: --bg-swap, or by default ISNET_BG_SWAP for the
        ISNet variants (the heatmap loss cannot see a background feature that switches units off; see
        `isnet_cli.objective.swap`) and 0 for the standard classifier and RRR, which stay the plain methods."""
        if self.bg_swap is not None:
            return self.bg_swap
        return ISNET_BG_SWAP if self.uses_lrp_loss else 0.0

    @property
    def starts_from_warm_up(self) -> bool:
        """--warm-start, or by default on for an ISNet whose C1/C2 come from the warm-up (--cut auto) and whose
        warm-up sees swapped backgrounds; with --bg-swap 0 the warm-up learns a background shortcut, so the
        ISNet starts afresh (the reference's method)."""
        if self.warm_start is not None:
            return self.warm_start
        return self.uses_lrp_loss and self.cut == "auto" and self.background_swap > 0

    @property
    def ramp_epochs(self) -> int:
        """--ramp, or by default ISNET_RAMP epochs (at most half the run, so a short run still trains at full P)
        for an ISNet trained with the background swap; 0 with --bg-swap 0, the reference's method (a ramp
        without the swap lets the CE learn the shortcut first)."""
        if self.ramp is not None:
            return self.ramp
        return min(ISNET_RAMP, self.epochs // 2) if self.uses_lrp_loss and self.background_swap > 0 else 0

    def recipe(self) -> dict[str, Any]:
        """The YAML recipe: every training option, data paths absolute; `name` and `no_progress` left out
        (a re-run gets a new folder)."""
        d = dataclasses.asdict(self)
        for key in ("name", "no_progress"):
            d.pop(key)
        auto = d.pop("auto_masks")
        if auto:  # re-run from the user's data: the completed manifests are regenerated (or cached)
            d["data"], d["val"] = auto["data"], auto["val"]
        for key in ("data", "val", "ood", "out", "cache", "segmenter"):
            if d[key]:
                d[key] = str(Path(d[key]).resolve())
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(None, f"unknown training option(s) {unknown}", f"known: {', '.join(sorted(known))}")
        return cls(**data)
