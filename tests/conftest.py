"""Shared fixtures: the real data beside the project, generated phantoms, trained shortcut models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """`$ISNET_SHARED_DATA`, else `../shared/data` beside the project root."""
    return Path(os.environ.get("ISNET_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real test data not found at {path} (set ISNET_SHARED_DATA or place shared/ beside the repo)")
    return path


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small unbiased PNG phantom set (48 images, 64 px); returns its manifest."""
    from isnet_cli.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("phantoms"), n=48, size=64, seed=0)


@pytest.fixture(scope="session")
def shortcut_runs(tmp_path_factory: pytest.TempPathFactory):
    """A `none` baseline and default ISNets (two seeds) trained on shortcut-biased phantoms (tests/shortcut.py)."""
    from tests.shortcut import train_shortcut_runs

    return train_shortcut_runs(tmp_path_factory.mktemp("shortcut"))


@pytest.fixture(scope="session")
def colour_shortcut_runs(tmp_path_factory: pytest.TempPathFactory):
    """The same experiment on colour face phantoms (face masks, red background marker; tests/shortcut.py)."""
    from tests.shortcut import train_shortcut_runs

    return train_shortcut_runs(tmp_path_factory.mktemp("colour-shortcut"), kind="faces")
