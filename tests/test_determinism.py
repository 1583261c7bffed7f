"""`--deterministic` with a seed: two CPU training runs give bit-identical weights; another seed does not."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from isnet_cli.synth import synthesize
from isnet_cli.train import TrainConfig, train

TINY = dict(arch="tinycnn", img_size=32, batch_size=8, epochs=2, no_progress=True, heatmaps=0, cut="1,25")


def test_two_deterministic_cpu_runs_are_bit_identical(tmp_path: Path) -> None:
    data = synthesize(tmp_path / "data", n=32, size=32, bias=1.0, seed=2)
    common = dict(TINY, data=str(data), deterministic=True, out=str(tmp_path / "runs"), cache=str(tmp_path / "c"))
    # stochastic ISNet: the explained logit is drawn at random each step, so the RNG is exercised too
    runs = [
        train(TrainConfig(name=name, seed=seed, variant="stochastic", **common)).run_dir
        for name, seed in (("a", 7), ("b", 7), ("c", 8))
    ]
    a, b, c = (load_file(str(run / "last.safetensors")) for run in runs)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], c[k]) for k in a), "another seed must give other weights"
