"""`isnet data synth` and `isnet data check` through the real entry point (exit codes, JSON, every bad file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isnet_cli.io.dicom import write_dicom
from isnet_cli.synth import make_phantom

ISNET = [sys.executable, "-m", "isnet_cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ISNET, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_synth_then_check(tmp_path):
    out = tmp_path / "ph"
    r = run("data", "synth", out, "--n", 12, "--size", 32, "--bias", "1.0", "--seed", 3, "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run("data", "check", out / "manifest.csv", "--json", "--no-progress", "--size", 16)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["samples"] == 12 and report["classes"] == ["normal", "opacity"]
    assert sum(sum(v.values()) for v in report["counts"].values()) == 12
    assert report["height"] == {"min": 32, "median": 32, "max": 32}
    assert 10 < report["mask_coverage_percent"]["median"] < 50
    table = run("data", "check", out, "--no-progress")
    assert table.returncode == 0 and "mask coverage" in table.stdout
    again = run("data", "synth", out, "--n", 2, "--no-progress")
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_synth_dicom(tmp_path):
    r = run("data", "synth", tmp_path, "--n", 4, "--size", 32, "--format", "dcm", "--photometric", "MONOCHROME1",
            "--bits", "16", "--compression", "jpeg2000", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "images").glob("*.dcm"))) == 4
    assert run("data", "check", tmp_path, "--no-progress").returncode == 0


@pytest.fixture
def bad_dataset(tmp_path: Path) -> Path:
    """One good sample and five bad ones, each bad in its own way."""
    img = make_phantom(np.random.default_rng(0), 32, 1, False)
    (tmp_path / "m").mkdir()
    Image.fromarray((img.image * 255).astype(np.uint8)).save(tmp_path / "good.png")
    Image.fromarray(img.mask.astype(np.uint8) * 255).save(tmp_path / "m" / "good.png")
    dcm = write_dicom(tmp_path / "full.dcm", img.image, bits=16)
    (tmp_path / "truncated.dcm").write_bytes(dcm.read_bytes()[:-700])
    dcm.unlink()
    (tmp_path / "text.dcm").write_text("patient notes, not an image\n")
    Image.fromarray(np.full((32, 48), 255, np.uint8)).save(tmp_path / "m" / "wide.png")  # wrong aspect
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "m" / "empty.png")
    rows = [
        "good.png,m/good.png,opacity",
        "truncated.dcm,m/good.png,opacity",
        "text.dcm,m/good.png,normal",
        "good.png,m/wide.png,normal",
        "good.png,m/empty.png,normal",
        "missing.png,m/good.png,normal",
    ]
    (tmp_path / "manifest.csv").write_text("image,mask,label\n" + "\n".join(rows) + "\n")
    return tmp_path


def test_check_lists_every_bad_file(bad_dataset):
    r = run("data", "check", bad_dataset / "manifest.csv", "--json", "--no-progress")
    assert r.returncode == 2
    bad = {Path(b["file"]).name: b["problem"] for b in json.loads(r.stdout)["bad"]}
    assert set(bad) == {"truncated.dcm", "text.dcm", "wide.png", "empty.png", "missing.png"}
    assert "cannot decode pixel data" in bad["truncated.dcm"]
    assert "no pixel data" in bad["text.dcm"] or "not a readable DICOM" in bad["text.dcm"]
    assert "aspect differs" in bad["wide.png"] and "mask is empty" in bad["empty.png"]
    assert bad["missing.png"] == "file not found"
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "5 bad file(s)" in err[0]
    table = run("data", "check", bad_dataset / "manifest.csv", "--no-progress")
    assert table.returncode == 2 and all(name in table.stdout for name in bad)


@pytest.mark.parametrize(
    "row, name",
    [
        ("truncated.dcm,m/good.png,opacity", "truncated.dcm"),
        ("text.dcm,m/good.png,normal", "text.dcm"),
        ("good.png,m/wide.png,normal", "wide.png"),
        ("good.png,m/empty.png,normal", "empty.png"),
    ],
)
def test_each_bad_file_is_one_line_naming_it(bad_dataset, row, name):
    """Through the library: each problem is one InputError line that starts with the file's path."""
    from isnet_cli.errors import InputError
    from isnet_cli.io.contract import InputContract
    from isnet_cli.io.preprocess import preprocess_file

    image, mask, _ = row.split(",")
    with pytest.raises(InputError) as exc:
        preprocess_file(bad_dataset / image, InputContract(size=32), bad_dataset / mask, mask_required=True)
    message = str(exc.value)
    assert "\n" not in message and message.startswith(str(bad_dataset / (mask if "m/" + name == mask else image)))


def test_manifest_level_errors_exit_2(bad_dataset):
    r = run("data", "check", bad_dataset / "manifest.csv", "--label-column", "diagnosis", "--no-progress")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {bad_dataset / 'manifest.csv'}: no label column 'diagnosis' (columns: image, mask, label); "
        "add a 'label' column with class names or choose one with --label-column"
    ]
    r = run("data", "check", bad_dataset / "nothing.csv", "--no-progress")
    assert r.returncode == 2 and "dataset not found" in r.stderr


def test_usage_errors_exit_2(tmp_path):
    assert run("data", "synth", tmp_path, "--format", "gif").returncode == 2
    assert run("data", "synth", tmp_path, "--bias", "often", "--no-progress").returncode == 2
    assert run("data", "check", "--help").returncode == 0


@pytest.mark.parametrize(
    "folder, counts, coverage",
    [("ieee8023_gb100", {"0": 34, "1": 64}, (30, 45)), ("tb_shenzhen_montgomery72", {"1": 72}, (20, 33))],
)
def test_check_real_data(shared_data, folder, counts, coverage):
    """Every real X-ray and mask reads, aligns and is non-empty; lungs cover the documented share."""
    from isnet_cli.io.check import check_dataset

    report = check_dataset(shared_data / folder, size=64)
    assert report["ok"], report["bad"]
    assert {c: sum(v.values()) for c, v in report["counts"].items()} == counts
    assert report["readable_images"] == report["masks"] == sum(counts.values())
    assert coverage[0] < report["mean_mask_coverage_percent"] < coverage[1]
    assert report["mask_coverage_percent_resized"]["min"] > 5


def test_check_plain_dicom_folder(shared_data):
    from isnet_cli.io.check import check_dataset

    report = check_dataset(shared_data / "dicom")
    assert report["ok"] and report["readable_images"] == 5 and report["classes"] == []
