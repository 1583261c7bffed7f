"""`isnet train`: the shortcut mission, the run folder, resume, Ctrl-C, DDP, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from isnet_cli.commands.train import command as train_command
from isnet_cli.errors import InputError
from isnet_cli.infer.checkpoint import read_meta
from isnet_cli.synth import synthesize
from isnet_cli.train import TrainConfig, TrainingDiverged, TrainingInterrupted, train
from isnet_cli.train.run_folder import METRIC_COLUMNS, STEP_COLUMNS, read_metrics
from tests.shortcut import score

REPO = Path(__file__).resolve().parents[1]
TINY = dict(arch="tinycnn", img_size=32, batch_size=8, epochs=2, no_progress=True, heatmaps=2, seed=0)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 phantoms at 32 px (32 train / 8 validation)."""
    return synthesize(tmp_path_factory.mktemp("tiny"), n=40, size=32, bias=1.0, seed=5)


# ---------------------------------------------------------------------------------------------- mission


@pytest.mark.slow
def test_mission_isnet_ignores_the_background_shortcut_that_the_baseline_learns(shortcut_runs) -> None:
    """The default recipe on ResNet-18, two seeds: both ISNets learn the lesion and ignore the marker."""
    r = shortcut_runs
    sets = ("test_biased", "test_clean", "test_flipped")
    base = {name: score(r.baseline, getattr(r, name)) for name in sets}
    # the standard classifier learned the marker: perfect with it, wrong when it is flipped
    assert base["test_biased"].accuracy >= 0.95
    assert base["test_flipped"].accuracy <= 0.30
    for run in r.isnets:
        isnet = {name: score(run, getattr(r, name)) for name in sets}
        acc = {name: s.accuracy for name, s in isnet.items()}
        # the ISNet learned the lesion: the marker does not matter (issue 8's bar for the 5-seed study)
        assert acc["test_flipped"] >= 0.85, (run.name, acc)
        assert abs(acc["test_clean"] - acc["test_flipped"]) <= 0.05, (run.name, acc)
        assert acc["test_biased"] >= 0.85, (run.name, acc)
        # and its relevance is in the lungs, the baseline's is not
        assert isnet["test_flipped"].share_inside >= 0.6, run.name
        assert isnet["test_flipped"].share_inside >= base["test_flipped"].share_inside + 0.35, run.name


@pytest.mark.slow
def test_run_folder_has_everything_and_config_yaml_reproduces_the_options(shortcut_runs) -> None:
    run = shortcut_runs.isnet
    for name in (
        "best.safetensors",
        "last.safetensors",
        "last.state.pt",
        "metrics.csv",
        "config.json",
        "config.yaml",
        "curves.png",
        "card.md",
        "steps.csv",
        "diagnostics.png",
    ):
        assert (run / name).is_file(), name
    rows = read_metrics(run / "metrics.csv")
    assert list(rows[0]) == list(METRIC_COLUMNS)
    assert rows[-1]["health"] == "ok" and "## Training health" in (run / "card.md").read_text()
    # steps.csv: the warm-up, then every training step; the per-term gradient norms every GRAD_TERMS_EVERY steps
    steps = read_metrics(run / "steps.csv")
    assert list(steps[0]) == list(STEP_COLUMNS)
    phases = [s["phase"] for s in steps]
    assert phases[0] == "C1/C2 warm-up" and phases[-1] == "train"
    train_steps = [s for s in steps if s["phase"] == "train"]
    assert len(train_steps) == len(rows) * 20  # 320 training images, batch 16
    # the split is logged every 10th step of the epochs that train with the heatmap loss: the ramp's first
    # epoch has P = 0 (plain CE, no relevance)
    config = json.loads((run / "config.json").read_text())
    with_heat = len(rows) - 1 if config["ramp_epochs"] else len(rows)
    split = [s for s in train_steps if s["grad_heat"]]
    assert len(split) == with_heat * 2 and all(float(s["grad_ce"]) > 0 for s in split)
    assert all(s["relevance_mass"] and float(s["grad_norm"]) > 0 for s in train_steps if s["epoch"] != "1")
    assert len(rows) == int(json.loads((run / "config.json").read_text())["epochs"])
    assert (run / "heatmaps" / f"epoch_{len(rows)}.png").is_file()
    meta = read_meta(run / "best.safetensors")
    assert meta["classes"] == ["normal", "opacity"]
    assert meta["contract"]["size"] == 64
    isnet = meta["isnet"]
    assert isnet["variant"] == "selective" and 0 < isnet["C1"] < isnet["C2"]
    assert meta["data"]["train_counts"] == {"normal": 160, "opacity": 160}
    assert len(meta["data"]["sha256"]) == 64
    config = json.loads((run / "config.json").read_text())
    assert (config["C1"], config["C2"]) == (isnet["C1"], isnet["C2"])
    # parsing the written config.yaml gives back the options of the run
    ctx = train_command.make_context("train", ["--config", str(run / "config.yaml")])
    for key, value in ctx.params.items():
        if key in config and key not in ("resume", "no_progress", "data", "out", "cache", "classes", "name"):
            assert value == config[key], key
    assert Path(ctx.params["data"]) == Path(config["data"]).resolve()
    baseline_meta = read_meta(shortcut_runs.baseline / "best.safetensors")
    assert baseline_meta["isnet"]["variant"] == "none" and baseline_meta["isnet"]["P"] == 0.0
    # without a heatmap loss the whole gradient is the CE's: no split into a CE and a heatmap part is logged
    baseline_steps = read_metrics(shortcut_runs.baseline / "steps.csv")
    assert all(float(s["grad_norm"]) > 0 for s in baseline_steps)
    assert not any(s["grad_ce"] or s["grad_heat"] for s in baseline_steps)


# ---------------------------------------------------------------------------------------------- resume


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last.safetensors"))


def test_curves_are_drawn_at_most_every_plot_interval_and_after_the_last_epoch(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epochs of a second: curves.png and diagnostics.png are drawn after the first epoch, then not again
    within the interval except after the last epoch or an interruption; with no interval, after every
    epoch. The per-epoch heatmap figures are all written."""
    from isnet_cli.train import epoch, run_folder

    drawn: list[int] = []
    plot_curves = run_folder.plot_curves

    def counting(path: Path, rows: list) -> None:
        drawn.append(len(rows))
        plot_curves(path, rows)

    monkeypatch.setattr(run_folder, "plot_curves", counting)
    cfg = dict(TINY, data=str(tiny_data), variant="none", epochs=3, out=str(tmp_path), cache=str(tmp_path / "c"))
    run = train(TrainConfig(name="slow-plots", **cfg)).run_dir
    assert drawn == [1, 3]
    assert (run / "curves.png").is_file() and (run / "diagnostics.png").is_file()
    assert sorted(p.name for p in (run / "heatmaps").iterdir()) == [f"epoch_{i}.png" for i in (1, 2, 3)]
    drawn.clear()
    with pytest.raises(TrainingInterrupted):
        train(TrainConfig(name="stopped", **cfg), on_step=lambda e, s: (e, s) == (1, 1))
    assert drawn == [1, 1]  # after epoch 1, and at the interruption in epoch 2 (its rows: epoch 1's)
    drawn.clear()
    monkeypatch.setattr(epoch, "PLOT_EVERY_SECONDS", 0.0)
    train(TrainConfig(name="every-epoch", **cfg))
    assert drawn == [1, 2, 3]


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tiny_data: Path, tmp_path: Path) -> None:
    # stochastic: the explained logit is drawn from the global RNG, so the RNG state must be restored too
    cfg = dict(
        TINY,
        data=str(tiny_data),
        variant="stochastic",
        cut_epochs=1,
        deterministic=True,
        out=str(tmp_path),
        cache=str(tmp_path / "cache"),
    )
    straight = train(TrainConfig(name="straight", **cfg))

    stops = iter([(0, 4), (1, 2)])  # after epoch 1 (4 steps of 8), then in the middle of epoch 2
    nxt = next(stops)

    def on_step(epoch: int, step: int) -> bool:
        nonlocal nxt
        if (epoch, step) == nxt:
            nxt = next(stops, None)
            return True
        return False

    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(TrainConfig(name="stopped", **cfg), on_step=on_step)
    run = tmp_path / "stopped"
    assert len(read_metrics(run / "metrics.csv")) == 1
    with pytest.raises(TrainingInterrupted, match="epoch 2, step 2"):
        train(TrainConfig(), resume=run, on_step=on_step)
    state = torch.load(run / "last.state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)
    # the optimizer runs torch's fused AdamW kernel on CPU, and a resumed run keeps it
    assert [g["fused"] for g in state["optimizer"]["param_groups"]] == [True]
    resumed = train(TrainConfig(), resume=run / "last.safetensors")
    assert resumed.cut == straight.cut
    a, b = _weights(straight.run_dir), _weights(run)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert len(read_metrics(run / "metrics.csv")) == 2


def test_ctrl_c_saves_last_and_exits_130_then_resume_finishes(tiny_data: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "isnet_cli",
        "train",
        str(tiny_data),
        "--arch",
        "tinycnn",
        "--img-size",
        "32",
        "--batch-size",
        "8",
        "--epochs",
        "500",
        "--cut",
        "1,25",
        "--out",
        str(tmp_path),
        "--name",
        "run",
        "--no-progress",
        "--heatmaps",
        "0",
    ]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.csv"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(read_metrics(metrics)) >= 1) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "isnet train --resume" in err
    state = torch.load(tmp_path / "run" / "last.state.pt", weights_only=True)
    done = len(read_metrics(metrics))
    assert state["epoch"] >= 1
    # continue for one more epoch than were completed
    result = CliRunner().invoke(
        train_command, ["--resume", str(tmp_path / "run"), "--epochs", str(done + 1), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert len(read_metrics(metrics)) == done + 1


# ---------------------------------------------------------------------------------------------- DDP


def _ddp_worker(cfg: TrainConfig, out: str) -> None:
    """One process of a torchrun-style run (RANK etc. set by `distributed.spawn`): train, keep the weights."""
    from isnet_cli.train.fit import train_process

    result = train_process(cfg, resuming=False)
    state = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    torch.save(state, f"{out}/rank{os.environ['RANK']}.pt")


def test_ddp_two_cpu_processes_train_and_agree_on_the_weights(tiny_data: Path, tmp_path: Path) -> None:
    from isnet_cli.backbones import build_model
    from isnet_cli.distributed import spawn

    cfg = TrainConfig(
        data=str(tiny_data),
        **dict(TINY, epochs=1),
        cut="1,25",
        device="cpu",
        out=str(tmp_path / "runs"),
        name="ddp",
        cache=str(tmp_path / "cache"),
    )
    spawn(_ddp_worker, (cfg, str(tmp_path)), 2)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    torch.manual_seed(0)
    init = build_model("tinycnn", 2).state_dict()
    assert not torch.equal(init["classifier.weight"], w0["classifier.weight"])  # it trained
    # only rank 0 wrote the run folder, and the saved weights are the agreed ones
    saved = load_file(str(tmp_path / "runs" / "ddp" / "last.safetensors"))
    assert torch.equal(saved["classifier.weight"], w0["classifier.weight"])
    assert json.loads((tmp_path / "runs" / "ddp" / "config.json").read_text())["world_size"] == 2


def test_devices_2_spawns_two_processes_and_returns_the_run(tiny_data: Path, tmp_path: Path) -> None:
    """`isnet train --devices 2` on CPU: two gloo processes, one run folder written by rank 0."""
    result = train(
        TrainConfig(
            data=str(tiny_data),
            **dict(TINY, epochs=1),
            cut="1,25",
            device="cpu",
            devices=2,
            out=str(tmp_path),
            name="spawned",
        )
    )
    assert result.run_dir == tmp_path / "spawned"
    assert json.loads((result.run_dir / "config.json").read_text())["world_size"] == 2
    assert result.last is not None and np.isfinite(float(result.last["train_loss"]))
    assert (result.run_dir / "last.safetensors").is_file()


def test_a_finished_worker_exits_at_once_with_its_output_flushed(tmp_path: Path) -> None:
    """Workers of a multi-process run leave through `exit_worker` (os._exit, no interpreter teardown):
    buffered output must still arrive, and the exit code must be the command's."""
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # output to a pipe is buffered
    code = "from isnet_cli.distributed import exit_worker\nprint('all written', end='')\nexit_worker(3)\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=buffered, timeout=120
    )
    assert (done.returncode, done.stdout) == (3, "all written")
    # a torchrun worker running a CLI command (WORLD_SIZE > 1) takes the same exit
    env = {**buffered, "WORLD_SIZE": "2", "PYTHONPATH": str(REPO)}
    out = tmp_path / "phantoms"
    args = [sys.executable, "-m", "isnet_cli", "data", "synth", str(out), "--n", "4", "--size", "32", "--no-progress"]
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 4 png phantoms" in done.stdout + done.stderr and (out / "manifest.csv").is_file()


# ---------------------------------------------------------------------------------------------- variants


@pytest.mark.parametrize(("variant", "method"), [("original", "isnet"), ("none", "rrr")])
def test_other_variants_train_three_classes(tmp_path: Path, variant: str, method: str) -> None:
    data = synthesize(tmp_path / "data", n=36, size=32, classes=("a", "b", "c"), seed=1)
    result = train(
        TrainConfig(
            data=str(data),
            **dict(TINY, epochs=1),
            variant=variant,
            method=method,
            cut_epochs=1,
            out=str(tmp_path),
            name="run",
        )
    )
    row = result.last
    assert row is not None and np.isfinite(float(row["train_loss"]))
    if method == "rrr":
        assert float(row["train_background"]) > 0  # the RRR penalty is reported as the background part
    meta = read_meta(result.run_dir / "last.safetensors")
    assert meta["num_classes"] == 3 and meta["isnet"]["method"] == method


# ---------------------------------------------------------------------------------------------- LRP deep supervision


def test_lds_run_tunes_and_records_one_cut_per_layer(tiny_data: Path, tmp_path: Path) -> None:
    result = train(
        TrainConfig(
            data=str(tiny_data),
            **dict(TINY, arch="tinyresnet", epochs=1),
            lds=True,
            cut_epochs=1,
            out=str(tmp_path),
            name="lds",
        )
    )
    isnet = read_meta(result.run_dir / "last.safetensors")["isnet"]
    assert list(isnet["lds_cuts"]) == ["layer1", "layer2", "layer3"]  # TinyResNet's stages, in order
    for c1, c2 in isnet["lds_cuts"].values():
        assert 0 < c1 < c2
    assert isnet["lds_decay"] == 1.0 and 0 < isnet["C1"] < isnet["C2"]
    state = torch.load(result.run_dir / "last.state.pt", weights_only=True)
    assert state["lds_cuts"] == isnet["lds_cuts"]  # a resumed run keeps them
    assert np.isfinite(float(result.last["train_loss"]))


def test_lds_moves_hidden_layer_relevance_into_the_lungs(tiny_data: Path) -> None:
    """40 steps on one batch of biased phantoms (P = 0.9): with LDS the share of |R| inside the lungs at
    the hidden layers rises well above what the input-map loss alone gives them (0.43 vs 0.33 here)."""
    from isnet_cli.backbones import build_model
    from isnet_cli.io.contract import InputContract
    from isnet_cli.io.dataset import XrayDataset, read_dataset
    from isnet_cli.lrp import LRP
    from isnet_cli.objective.loss import heatmap_loss
    from isnet_cli.objective.objective import Objective
    from isnet_cli.objective.settings import HeatmapLossParams

    layers = ("layer1", "layer2", "layer3")
    spec = read_dataset(tiny_data)
    x, mask, y = next(
        iter(
            torch.utils.data.DataLoader(
                XrayDataset(spec.samples, ["normal", "opacity"], InputContract(size=32)), batch_size=16
            )
        )
    )

    def hidden_share(model: torch.nn.Module) -> float:
        lrp = LRP(model.eval(), hidden=layers)
        with torch.no_grad():
            lrp(x, "selective")
        return float(
            np.mean([heatmap_loss(lrp.hidden[n], mask, HeatmapLossParams()).share_inside.mean() for n in layers])
        )

    shares = {}
    for lds in (False, True):
        torch.manual_seed(0)
        model = build_model("tinyresnet", 2)
        cuts = {n: (1.0, 25.0) for n in layers} if lds else None
        objective = Objective(
            TrainConfig(arch="tinyresnet", P=0.9, lds=lds).objective_settings(),
            model,
            torch.device("cpu"),
            (1.0, 25.0),
            cuts,
        )
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(40):
            model.train()
            opt.zero_grad()
            objective(x, mask, y).loss.backward()
            opt.step()
        shares[lds] = hidden_share(model)
    assert shares[True] >= shares[False] + 0.05, shares


def test_lds_bad_options_exit_2(tiny_data: Path, tmp_path: Path) -> None:
    assert "--cut auto" in str(_error([str(tiny_data), "--arch", "tinycnn", "--lds", "--cut", "1,25"]))
    assert "heatmap loss" in str(_error([str(tiny_data), "--arch", "tinycnn", "--lds", "--variant", "none"]))
    user_model = [
        "--arch",
        "tests.tiny_models:small_resnet",
        "--img-size",
        "32",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    message = str(_error([str(tiny_data), *user_model, "--lds"]))
    assert "--lds-layers" in message and "block1" in message  # names the model's own modules
    assert "'stage9'" in str(_error([str(tiny_data), *user_model, "--lds", "--lds-layers", "block1,stage9"]))
    assert not any((tmp_path / name).is_dir() for name in ("run-001", "run-1"))  # no run folder left behind


# ---------------------------------------------------------------------------------------------- bad input


def _error(args: list[str]) -> InputError:
    """Run `isnet train ARGS`; it must fail with an InputError (the CLI prints it on one line, exit 2)."""
    result = CliRunner().invoke(train_command, args)
    assert isinstance(result.exception, InputError), result.output
    assert result.exception.exit_code == 2
    return result.exception


def test_empty_mask_is_a_clear_error_naming_the_file(tiny_data: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data.parent, data)
    first_mask = next(iter(sorted((data / "masks").iterdir())))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(first_mask)
    error = _error(
        [
            str(data / "manifest.csv"),
            "--arch",
            "tinycnn",
            "--img-size",
            "32",
            "--out",
            str(tmp_path / "runs"),
            "--no-progress",
        ]
    )
    assert first_mask.name in str(error) and "empty" in str(error)


def test_labels_outside_the_class_list_are_rejected(tiny_data: Path, tmp_path: Path) -> None:
    error = _error([str(tiny_data), "--classes", "normal,effusion", "--out", str(tmp_path)])
    assert "label 'opacity'" in str(error) and "not in the class list" in str(error)
    assert not any(tmp_path.iterdir())  # nothing was written


def test_bad_options_and_config_keys_exit_2(tiny_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("arch: tinycnn\nlearning_rate: 0.1\n")
    assert "learning_rate" in str(_error([str(tiny_data), "--config", str(bad)]))
    assert "--P" in str(_error([str(tiny_data), "--P", "1.5"]))
    assert "C1 < C2" in str(_error([str(tiny_data), "--cut", "5,1"]))
    assert "no training data" in str(_error(["--arch", "tinycnn"]))
    assert "--bg-swap" in str(_error([str(tiny_data), "--bg-swap", "1.5"]))
    assert "--cut auto" in str(_error([str(tiny_data), "--warm-start", "--cut", "1,25"]))
    assert "--cut auto" in str(_error([str(tiny_data), "--warm-start", "--variant", "none"]))


def test_background_swap_defaults_to_the_isnet_variants_only() -> None:
    assert TrainConfig(variant="selective").background_swap == 1.0
    assert TrainConfig(variant="none").background_swap == 0.0
    assert TrainConfig(variant="none", method="rrr").background_swap == 0.0
    assert TrainConfig(variant="none", bg_swap=0.5).background_swap == 0.5
    assert TrainConfig(variant="none").needs_masks is False  # the standard classifier still trains without masks
    assert TrainConfig(variant="none", bg_swap=0.5).needs_masks is True


def test_warm_start_and_ramp_default_to_the_isnet_trained_with_the_swap() -> None:
    isnet = TrainConfig(variant="selective")
    assert isnet.starts_from_warm_up and isnet.ramp_epochs == 5
    reference = TrainConfig(variant="selective", bg_swap=0.0)  # the warm-up would learn a background shortcut
    assert not reference.starts_from_warm_up and reference.ramp_epochs == 0
    fixed_cut = TrainConfig(variant="selective", cut="1,25")  # no warm-up to start from
    assert not fixed_cut.starts_from_warm_up and fixed_cut.ramp_epochs == 5
    standard = TrainConfig(variant="none")
    assert not standard.starts_from_warm_up and standard.ramp_epochs == 0
    assert TrainConfig(variant="selective", epochs=4).ramp_epochs == 2  # at most half of a short run
    chosen = TrainConfig(variant="selective", warm_start=False, ramp=0)
    assert not chosen.starts_from_warm_up and chosen.ramp_epochs == 0


def test_warm_start_continues_from_the_warm_up_weights(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    """With --warm-start the ISNet's first step starts from the warmed-up weights, otherwise from a fresh model."""
    import isnet_cli.train.trainer as T

    seen: dict[bool, list[torch.Tensor]] = {}
    real = T.Trainer.tune_cut

    def spy(self, model, progress, keep_weights=False):
        before = [p.detach().clone() for p in model.parameters()]
        cuts = real(self, model, progress, keep_weights)
        changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
        seen.setdefault(keep_weights, []).append(torch.tensor(changed))
        return cuts

    monkeypatch.setattr(T.Trainer, "tune_cut", spy)
    cfg = dict(TINY, data=str(tiny_data), epochs=1, cut_epochs=1, out=str(tmp_path))
    train(TrainConfig(name="fresh", warm_start=False, **cfg))
    train(TrainConfig(name="warm", **cfg))  # the default for an ISNet with the swap on
    assert not bool(seen[False][0]) and bool(seen[True][0])


def test_non_finite_losses_are_skipped_then_stop_training(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    import isnet_cli.objective.objective as T  # the training loss is computed there

    real = T.heatmap_loss
    calls = {"n": 0, "poison": {2, 3}}

    def poisoned(relevance, mask, params):
        out = real(relevance, mask, params)
        calls["n"] += 1
        if relevance.requires_grad and calls["n"] in calls["poison"]:
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(T, "heatmap_loss", poisoned)
    cfg = dict(TINY, data=str(tiny_data), epochs=1, cut="1,25", out=str(tmp_path))
    result = train(TrainConfig(name="skips", **cfg))
    assert result.skipped_steps == 2
    assert read_metrics(result.run_dir / "metrics.csv")[0]["skipped_steps"] == "2"
    assert np.isfinite(float(result.last["train_loss"]))

    calls["n"], calls["poison"] = 0, set(range(1000))
    with pytest.raises(TrainingDiverged, match="3 non-finite losses/gradients in a row"):
        train(TrainConfig(name="diverged", max_bad_steps=3, **cfg))
