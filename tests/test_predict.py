"""`isnet predict`: checkpoint and ONNX agree, ONNX never imports torch, bad files are skipped, --resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.tiny_models import REPO, isnet, shared_tiny_run

NO_TORCH = (
    "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
    "from isnet_cli.cli import main; sys.argv = ['isnet'] + sys.argv[1:]; main()"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def onnx_model(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    code, _, stderr = isnet("export", "--model", tiny.checkpoint, "--out", out)
    assert code == 0, stderr
    return out


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_onnx_predict_matches_checkpoint_without_torch(tiny, onnx_model):
    code, out, err = isnet("predict", tiny.images, "--model", tiny.checkpoint, "--json", "--batch-size", "8")
    assert code == 0, err
    torch_rows = json_lines(out)
    assert len(torch_rows) == 32
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, "predict", str(tiny.images), "--model", str(onnx_model), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "CPUExecutionProvider" in proc.stderr or "CUDAExecutionProvider" in proc.stderr
    onnx_rows = json_lines(proc.stdout)
    assert [r["file"] for r in onnx_rows] == [r["file"] for r in torch_rows]
    assert [r["predicted"] for r in onnx_rows] == [r["predicted"] for r in torch_rows]
    p_torch = np.array([list(r["probabilities"].values()) for r in torch_rows])
    p_onnx = np.array([list(r["probabilities"].values()) for r in onnx_rows])
    assert np.abs(p_torch - p_onnx).max() < 1e-4
    # both classes are predicted: the comparison is not trivially one class everywhere
    assert {r["predicted"] for r in torch_rows} == {"normal", "opacity"}
    row = onnx_rows[0]
    assert set(row) >= {"file", "probabilities", "predicted", "preprocessing", "model_id"}
    assert row["preprocessing"]["size"] == 32 and row["model_id"] != torch_rows[0]["model_id"]


def test_predict_dicom_record_in_json(tiny, onnx_model, shared_data):
    dcm = shared_data / "dicom" / "cr_chest_pa_mono1_j2k_lossy_RG1_J2KI.dcm"
    code, out, err = isnet("predict", dcm, "--model", onnx_model, "--json")
    assert code == 0, err
    (row,) = json_lines(out)
    record = json.dumps(row["preprocessing"]).lower()
    assert "monochrome1" in record and row["predicted"] in ("normal", "opacity")


@pytest.fixture
def folder_with_bad_file(tiny, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for f in sorted(tiny.images.iterdir())[:6]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "00002_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return folder


def read_rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_bad_file_reported_and_skipped_then_resume(tiny, folder_with_bad_file, tmp_path, monkeypatch):
    folder, results = folder_with_bad_file, tmp_path / "results.csv"
    code, _, err = isnet("predict", folder, "--model", tiny.checkpoint, "--out", results, "--batch-size", "4")
    assert code == 2
    assert "00002_broken.png" in err and "1 of 7 inputs could not be used" in err
    rows = read_rows(results)
    assert len(rows) == 6 and all("broken" not in r["file"] for r in rows)
    assert list(rows[0]) == ["file", "predicted", "p_normal", "p_opacity", "model_id"]
    first_text = results.read_text()

    # without --resume an existing file is never overwritten
    code, _, err = isnet("predict", folder, "--model", tiny.checkpoint, "--out", results)
    assert code == 2 and "--resume" in err and results.read_text() == first_text

    # two new files; --resume must decode only those and the still-broken one
    for f in sorted(tiny.images.iterdir())[6:8]:
        (folder / f.name).write_bytes(f.read_bytes())
    import isnet_cli.io.preprocess as preprocess

    seen: list[str] = []
    original = preprocess.preprocess_file

    def counting(path, *args, **kwargs):
        seen.append(path.name)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(preprocess, "preprocess_file", counting)
    code, _, err = isnet("predict", folder, "--model", tiny.checkpoint, "--out", results, "--resume")
    assert code == 2
    assert sorted(seen) == sorted(["00002_broken.png", *[f.name for f in sorted(tiny.images.iterdir())[6:8]]])
    text = results.read_text()
    assert text.startswith(first_text)  # nothing already written was lost or rewritten
    assert len(read_rows(results)) == 8


def test_fail_fast_stops_at_the_bad_file(tiny, folder_with_bad_file, tmp_path):
    code, out, err = isnet("predict", folder_with_bad_file, "--model", tiny.checkpoint, "--fail-fast", "--json")
    assert code == 2 and "00002_broken.png" in err
    assert len(json_lines(out)) < 6


def test_resume_drops_a_half_written_row(tiny, tmp_path):
    from isnet_cli.infer.predict import ResultsFile

    path = tmp_path / "r.csv"
    files = sorted(tiny.images.iterdir())[:2]
    path.write_text(f"file,predicted,p_normal,p_opacity,model_id\n{files[0]},normal,0.9,0.1,abc\n{files[1]},nor")
    results = ResultsFile(path, ["normal", "opacity"], resume=True, overwrite=False)
    results.close()
    assert results.is_done(str(files[0])) and not results.is_done(str(files[1]))
    assert path.read_text().endswith(",abc\n")


def test_stdin_list_threshold_and_table(tiny):
    files = sorted(tiny.images.iterdir())[:4]
    stdin = "\n".join(str(f) for f in files) + "\n"
    code, out, err = isnet("predict", "-", "--model", tiny.checkpoint, "--json", stdin=stdin)
    assert code == 0, err
    rows = json_lines(out)
    assert [r["file"] for r in rows] == [str(f) for f in files]
    code, out, _ = isnet("predict", "-", "--model", tiny.checkpoint, "--json", "--threshold", "0", stdin=stdin)
    assert {r["predicted"] for r in json_lines(out)} == {"opacity"}  # p >= 0 always
    code, out, _ = isnet("predict", *files[:2], "--model", tiny.checkpoint)
    assert code == 0 and files[0].name in out and "p(opacity)" in out
    code, _, err = isnet("predict", files[0], "--model", tiny.checkpoint, "--threshold", "1.5")
    assert code == 2 and "outside [0, 1]" in err
