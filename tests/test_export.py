"""`isnet export`: ONNX / TorchScript files that reproduce the torch model, with their metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from isnet_cli.infer.checkpoint import load_checkpoint
from isnet_cli.infer.onnx_runtime import META_KEY, make_session, read_onnx_meta, sidecar_path
from tests.tiny_models import SIZE, isnet, shared_tiny_run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """model.onnx (+ model.heatmap.onnx) exported through the CLI."""
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    code, stdout, stderr = isnet("export", "--model", tiny.checkpoint, "--out", out, "--with-heatmap", "--json")
    assert code == 0, stderr
    return out, json.loads(stdout)


def phantom_batch(tiny, n: int = 5) -> np.ndarray:
    from isnet_cli.io.contract import InputContract
    from isnet_cli.io.preprocess import preprocess_file

    files = sorted(tiny.images.iterdir())[:n]
    return np.stack([preprocess_file(f, InputContract(size=SIZE)).x for f in files])


def test_onnx_matches_torch_with_dynamic_batch(tiny, exported):
    out, meta = exported
    model, _ = load_checkpoint(tiny.checkpoint)
    session = make_session(out, "cpu")
    for x in (phantom_batch(tiny, 5), phantom_batch(tiny, 1)):
        (got,) = session.run(["logits"], {"input": x})
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4
    assert meta["export"]["verified"]["max_abs_diff"] <= 1e-4
    assert meta["export"]["verified"]["batches"] == [3, 1]


def test_sidecar_and_metadata_props_round_trip(tiny, exported):
    out, meta = exported
    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props[META_KEY]) == meta == json.loads(sidecar_path(out).read_text())
    assert json.loads(props["classes"]) == ["normal", "opacity"]
    assert json.loads(props["input_contract"])["size"] == SIZE
    assert props["opset"] == "17" and meta["export"]["opset"] == 17
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert meta["export"]["source"]["file"] == "best.safetensors"
    # the graph is the plain classifier: one output, no relevance
    assert [o.name for o in proto.graph.output] == ["logits"]
    # without the sidecar the embedded copy is used
    sidecar_path(out).rename(out.with_suffix(".bak"))
    try:
        assert read_onnx_meta(out) == meta
    finally:
        out.with_suffix(".bak").rename(sidecar_path(out))


def test_heatmap_graph_matches_torch_engine(tiny, exported):
    from isnet_cli.lrp import LRP

    out, meta = exported
    heat = out.with_name(meta["export"]["heatmap"]["file"])
    assert heat.name == "model.heatmap.onnx"
    model, _ = load_checkpoint(tiny.checkpoint)
    x = phantom_batch(tiny, 4)
    logits, relevance = make_session(heat, "cpu").run(["logits", "relevance"], {"input": x})
    lrp = LRP(model, epsilon=0.01)
    expected = lrp(torch.from_numpy(x), "predicted").detach().numpy()
    # both classes are predicted in the batch: the graph picks the class per sample, not a traced constant
    assert set(lrp.logits.argmax(1).tolist()) == {0, 1}
    assert (logits.argmax(1) == lrp.logits.argmax(1).numpy()).all()
    assert relevance.shape == expected.shape == x.shape
    assert np.abs(relevance - expected).max() <= 1e-3 * np.abs(expected).max()
    assert np.abs(logits - lrp.logits.detach().numpy()).max() <= 1e-4
    assert meta["export"]["heatmap"]["verified"]["max_rel_diff"] <= 1e-3


def test_failed_verification_writes_nothing(tiny, tmp_path, monkeypatch):
    from isnet_cli.infer import export

    monkeypatch.setattr(export, "LOGIT_TOLERANCE", -1.0)  # no export can pass
    out = tmp_path / "bad.onnx"
    code, _, stderr = isnet("export", "--model", tiny.checkpoint, "--out", out)
    assert code == 1 and "differ from torch" in stderr
    assert list(tmp_path.iterdir()) == []


def test_torchscript_export(tiny, tmp_path):
    out = tmp_path / "model.pt"
    code, _, stderr = isnet("export", "--model", tiny.checkpoint, "--format", "torchscript", "--out", out)
    assert code == 0, stderr
    extra = {"isnet.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    model, _ = load_checkpoint(tiny.checkpoint)
    x = torch.from_numpy(phantom_batch(tiny, 2))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert json.loads(extra["isnet.json"])["classes"] == ["normal", "opacity"]
    assert json.loads(sidecar_path(out).read_text())["export"]["format"] == "torchscript"


def test_dynamo_exporter(tiny, tmp_path):
    out = tmp_path / "dyn.onnx"
    code, _, stderr = isnet("export", "--model", tiny.checkpoint, "--out", out, "--dynamo")
    assert code == 0, stderr
    meta = read_onnx_meta(out)
    assert meta["export"]["exporter"] == "dynamo" and meta["export"]["opset"] >= 18
    assert meta["export"]["verified"]["max_abs_diff"] <= 1e-4


def test_export_refuses_an_onnx_source(exported, tmp_path):
    out, _ = exported
    code, _, stderr = isnet("export", "--model", out, "--out", tmp_path / "again.onnx")
    assert code == 2 and "already an exported model" in stderr


def test_heatmap_export_residual_network(tmp_path):
    """Residual additions, overlapping max pool, avg-pool transition, functional global pool: still exports."""
    from isnet_cli.backbones import build_model
    from isnet_cli.infer.checkpoint import save_checkpoint
    from isnet_cli.infer.export import export_model
    from isnet_cli.io.contract import InputContract

    torch.manual_seed(0)
    arch = "tests.tiny_models:small_resnet"
    meta = {"arch": arch, "num_classes": 3, "classes": ["a", "b", "c"], "contract": InputContract(size=32).to_dict()}
    model = build_model(arch, 3)
    with torch.no_grad():  # non-trivial BN statistics, as after training
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    ckpt = save_checkpoint(tmp_path / "r.safetensors", model.eval(), meta)
    out = export_model(ckpt, tmp_path / "r.onnx", with_heatmap=True)
    assert out["export"]["heatmap"]["verified"]["max_rel_diff"] <= 1e-3
    assert (tmp_path / "r.heatmap.onnx").is_file()
