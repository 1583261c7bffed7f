"""`isnet info`: the model card of a checkpoint or an export, read without torch."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from tests.tiny_models import REPO, isnet, shared_tiny_run

NO_TORCH = (
    "import sys; sys.modules['torch'] = None\n"
    "from isnet_cli.cli import main; sys.argv = ['isnet'] + sys.argv[1:]; main()"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory)


def test_info_card_without_torch(tiny, tmp_path):
    onnx_path = tmp_path / "m.onnx"
    assert isnet("export", "--model", tiny.checkpoint, "--out", onnx_path)[0] == 0
    for model in (tiny.checkpoint, tiny.checkpoint.parent, onnx_path):
        proc = subprocess.run(
            [sys.executable, "-c", NO_TORCH, "info", str(model), "--json"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        card = json.loads(proc.stdout)
        path = onnx_path if model == onnx_path else tiny.checkpoint
        assert card["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert card["arch"] == "tinycnn" and card["classes"] == ["normal", "opacity"]
        assert card["contract"]["size"] == 32 and card["isnet"]["variant"] == "none"
        assert "torch" in card["versions"]
        assert ("export" in card) == (model == onnx_path)


def test_info_terminal_card(tiny):
    code, out, _ = isnet("info", tiny.checkpoint)
    assert code == 0
    for text in ("tinycnn", "normal", "opacity", "Input contract", "letterbox", "ISNet hyper-parameters", "sha256"):
        assert text in out


def test_info_bad_file(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = isnet("info", bad)
    assert code == 2 and "not an isnet checkpoint" in err
