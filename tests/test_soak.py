"""Short soak: repeated predict and explain keep resident memory flat and leave no hooks behind.

The long run (2,000 predictions, 500 explanations, goal < 10% growth) is `benchmarks/soak.py`; here the
bounds are generous, as a few dozen files give the allocator less room to settle, but a leak of a
figure, a tensor or a hook per file still shows.
"""

from __future__ import annotations

import pytest

from tests.soak import hook_count, phantoms, soak_explain, soak_predict

GROWTH_BOUND = 0.2


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return phantoms(tmp_path_factory.mktemp("soak"), 100)


def test_predict_200_files_keeps_memory_flat_and_adds_no_hooks(samples) -> None:
    result = soak_predict(samples * 2, warmup=40)
    assert result.n == 200 and result.failed == 0
    assert result.hooks_after == result.hooks_before, result.line()
    assert result.growth < GROWTH_BOUND, result.line()


def test_explain_50_files_keeps_memory_flat_and_adds_no_hooks(samples, tmp_path) -> None:
    result = soak_explain(samples[:50], warmup=10, out_dir=tmp_path / "heatmaps")
    assert result.n == 50 and result.failed == 0
    assert result.hooks_after == result.hooks_before, result.line()
    assert result.growth < GROWTH_BOUND, result.line()


def test_hook_count_sees_a_leaked_hook() -> None:
    """The hook check can fail: a hook left on a nested module is counted."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.ReLU()))
    before = hook_count(model)
    handles = [
        model[1][0].register_forward_hook(lambda *_: None),
        model[0].register_full_backward_hook(lambda *_: None),
        model.register_forward_pre_hook(lambda *_: None),
    ]
    assert hook_count(model) == before + 3
    for handle in handles:
        handle.remove()
    assert hook_count(model) == before
