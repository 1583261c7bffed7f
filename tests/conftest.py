"""Shared fixtures: the real data beside the project, generated phantoms, trained shortcut models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`tests/run.sh` runs one worker per core) each worker, and the `isnet` processes its
# tests start, get their share of the cores: torch's default of one thread per core in every worker
# would oversubscribe them. Set before any test module imports torch.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    os.environ.setdefault("MKL_NUM_THREADS", str(_share))

# The trained-model fixtures are session-wide: every test that uses one runs in the same xdist worker
# (`--dist loadgroup`), so each is trained once per run, not once per worker.
SHARED_TRAININGS = ("shortcut_runs", "colour_shortcut_runs")


# tryfirst: xdist's worker turns the marker into the test's group in its own collection hook, which would
# otherwise run before this one (plugins registered later are called first) and miss the marker.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for name in SHARED_TRAININGS:
            if name in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(name))


def require_xdist_groups(session: pytest.Session) -> None:
    """Under `--dist loadgroup`, fail (rather than train each shared model once per worker and double the
    run time unnoticed) when the worker did not apply the groups: it marks a grouped test by a `@group`
    suffix of its node id."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    ungrouped = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if ungrouped:
        pytest.fail(
            f"pytest-xdist did not group {ungrouped[0]} (pytest {pytest.__version__}): "
            "install the test extra's pytest (pip install -e '.[test]')"
        )


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
def shortcut_runs(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """A `none` baseline and default ISNets (two seeds) trained on shortcut-biased phantoms (tests/shortcut.py)."""
    from tests.shortcut import train_shortcut_runs

    require_xdist_groups(request.session)
    return train_shortcut_runs(tmp_path_factory.mktemp("shortcut"))


@pytest.fixture(scope="session")
def colour_shortcut_runs(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """The same experiment on colour face phantoms (face masks, red background marker; tests/shortcut.py)."""
    from tests.shortcut import train_shortcut_runs

    require_xdist_groups(request.session)
    return train_shortcut_runs(tmp_path_factory.mktemp("colour-shortcut"), kind="faces")
