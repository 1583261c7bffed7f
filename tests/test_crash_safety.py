"""Crash safety: kill -9 during training and during a checkpoint write, a full disk, a killed predict.

Every kill leaves a loadable checkpoint and a resumable run; the resumed deterministic run ends with the
same weights as one that was never killed. A file-size limit (RLIMIT_FSIZE) stands in for a full disk.
"""

from __future__ import annotations

import csv
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from isnet_cli.infer.checkpoint import load_checkpoint
from isnet_cli.synth import synthesize

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TRAIN = ["--arch", "tinycnn", "--img-size", "32", "--batch-size", "8", "--no-progress", "--heatmaps", "0"]
TRAIN += ["--cut", "1,25", "--seed", "0", "--deterministic"]

# Runs the CLI with checkpoint writes patched: the Nth checkpoint write stops half-way and the process kills itself,
# which is a kill -9 landing exactly inside a checkpoint write.
KILL_IN_WRITE = r"""
import os, signal, sys
import isnet_cli.infer.checkpoint as ck
n_kill, calls, real = int(os.environ["KILL_AT_WRITE"]), [0], ck.atomic_write_bytes
def dying(path, data, durable=True):
    calls[0] += 1
    if calls[0] == n_kill:
        with open(f"{os.path.dirname(path)}/.{os.path.basename(path)}.dying.tmp", "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, data, durable)
ck.atomic_write_bytes = dying
from isnet_cli.cli import main
sys.argv = ["isnet", *sys.argv[1:]]
main()
"""


def _isnet(*args: object, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "isnet_cli", *map(str, args)],
        env=kw.pop("env", ENV),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("crash"), n=40, size=32, bias=1.0, seed=5)


def _assert_consistent(run: Path) -> None:
    """What a kill must never break: the checkpoint loads, and the resume state loads weights-only."""
    if (run / "last.safetensors").exists():
        load_checkpoint(run / "last.safetensors")
    if (run / "last.state.pt").exists():
        state = torch.load(run / "last.state.pt", weights_only=True)
        assert state["weights"] is not None


@pytest.mark.slow
def test_kill_9_at_random_moments_and_inside_a_checkpoint_write_then_resume_matches(data: Path, tmp_path: Path) -> None:
    epochs = 3
    straight = _isnet("train", data, *TRAIN, "--epochs", epochs, "--out", tmp_path, "--name", "straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()
    run = tmp_path / "killed"
    # 1) killed inside the 3rd checkpoint write (epoch 2's last.safetensors: epoch 1 wrote last and best)
    env = {**ENV, "KILL_AT_WRITE": "3"}
    args = ["train", data, *TRAIN, "--epochs", epochs, "--out", tmp_path, "--name", "killed"]
    proc = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, *map(str, args)], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert list(run.glob(".*.dying.tmp")), "the kill landed inside a checkpoint write"
    _assert_consistent(run)
    kills = 1
    # 2) killed at random moments, each time resumed from where the last kill left it
    rng = random.Random(12)
    for _ in range(2):
        if not (run / "last.state.pt").exists():
            break
        proc = _isnet("train", "--resume", run, "--no-progress")
        start = time.monotonic()
        deadline = start + 300
        seen = (run / "last.state.pt").stat().st_mtime
        while time.monotonic() < deadline and proc.poll() is None and (run / "last.state.pt").stat().st_mtime == seen:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere in the next epoch or its writes
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        _assert_consistent(run)
    done = _isnet("train", "--resume", run, "--no-progress")
    assert done.wait(timeout=600) == 0, done.stderr.read()
    assert kills >= 2
    a, b = load_file(str(tmp_path / "straight" / "last.safetensors")), load_file(str(run / "last.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_previous_one(data: Path, tmp_path: Path) -> None:
    first = _isnet("train", data, *TRAIN, "--epochs", 1, "--out", tmp_path, "--name", "r")
    assert first.wait(timeout=600) == 0, first.stderr.read()
    run = tmp_path / "r"
    before = {p.name: p.read_bytes() for p in (run / "last.safetensors", run / "last.state.pt")}
    limit = len(before["last.safetensors"]) // 2  # room for config and metrics, not for a checkpoint

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _isnet("train", "--resume", run, "--epochs", 2, "--no-progress", preexec_fn=small_disk)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err
    assert "last.safetensors: cannot write" in err and "File too large" in err and "previous version is intact" in err
    assert "Traceback" not in err
    for name, blob in before.items():
        assert (run / name).read_bytes() == blob, name
    assert not list(run.glob(".*.tmp")), "no temp file is left behind"
    again = _isnet("train", "--resume", run, "--epochs", 2, "--no-progress")
    assert again.wait(timeout=600) == 0, again.stderr.read()
    assert load_checkpoint(run / "last.safetensors")[1]["epoch"] == 2


def test_predict_killed_half_way_then_resume_gives_every_row_once(tmp_path: Path) -> None:
    from tests.tiny_models import make_tiny_run

    tiny = make_tiny_run(tmp_path / "tiny", steps=5, n=32)
    images = tmp_path / "many"
    images.mkdir()
    sources = sorted(tiny.images.iterdir())
    for i in range(400):
        os.link(sources[i % len(sources)], images / f"img{i:04d}{sources[i % len(sources)].suffix}")
    out = tmp_path / "results.csv"
    args = ["predict", images, "--model", tiny.checkpoint, "--out", out, "--batch-size", "4", "--device", "cpu"]
    proc = _isnet(*args)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") > 40:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = out.read_bytes().count(b"\n") - 1
    assert 0 < partial < 400, partial
    resumed = _isnet(*args, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    files = [Path(r["file"]).name for r in rows]
    assert sorted(files) == sorted(p.name for p in images.iterdir())
    assert len(files) == len(set(files)) == 400
