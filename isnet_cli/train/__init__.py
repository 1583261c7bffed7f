"""ISNet training: `train(TrainConfig(...))` runs the loop and writes the run folder runs/<name>/.

`TrainConfig` is importable without torch (the CLI builds its options from it); the rest of the package
(`fit`, `trainer`, ...) imports torch and is loaded on first use of the names below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from isnet_cli.train.config import TrainConfig

if TYPE_CHECKING:
    from isnet_cli.train.fit import TrainingDiverged, TrainingInterrupted, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "TrainingInterrupted", "train"]

_FROM_FIT = ("TrainResult", "TrainingDiverged", "TrainingInterrupted", "train")


def __getattr__(name: str) -> Any:
    """The torch-dependent names, imported when first asked for (PEP 562)."""
    if name in _FROM_FIT:
        from isnet_cli.train import fit

        return getattr(fit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
