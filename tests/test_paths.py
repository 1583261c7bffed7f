"""Awkward paths: spaces, unicode, very long names, symlinks and a read-only input folder."""

from __future__ import annotations

import csv
import os
import shutil
import stat
from pathlib import Path

import pytest

from tests.tiny_models import isnet, shared_tiny_run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory)


def test_predict_reads_awkward_names_from_a_read_only_folder(tiny, tmp_path: Path) -> None:
    source = sorted(tiny.images.iterdir())[0]
    folder = tmp_path / "dossier röntgen 胸部"
    folder.mkdir()
    names = [
        "scan with spaces.png",
        "patiënt_ß_肺_😀.png",
        ("long_" * 48)[:240] + ".png",  # 244 bytes: near the 255-byte limit of most file systems
    ]
    for name in names:
        shutil.copy(source, folder / name)
    os.symlink(folder / names[0], folder / "link to scan.png")
    os.symlink(tmp_path / "missing.png", folder / "dangling.png")
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        out = tmp_path / "out dir ü" / "results.csv"
        code, _, err = isnet("predict", folder, "--model", tiny.checkpoint, "--out", out, "--device", "cpu")
        with out.open(encoding="utf-8") as fh:
            rows = {Path(r["file"]).name for r in csv.DictReader(fh)}
    finally:
        folder.chmod(stat.S_IRWXU)
    assert code == 0, err
    assert rows == {*names, "link to scan.png"}  # a folder lists the files it holds: the dangling link is none
    code, _, err = isnet("predict", folder / "dangling.png", "--model", tiny.checkpoint, "--device", "cpu")
    assert code == 2 and "dangling.png" in err and "Traceback" not in err


# --- existing outputs: refused without --exist-ok ------------------------------------------------------


def _two_images(tiny, folder: Path) -> Path:
    """A folder of two of the tiny run's images: explain over a folder without waiting on all 32."""
    folder.mkdir()
    for source in sorted(tiny.images.iterdir())[:2]:
        shutil.copy(source, folder / source.name)
    return folder


def _refused(code: int, err: str, path: Path) -> None:
    """Exit 2 and one stderr line that names `path` and the way on (--exist-ok)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and str(path) in lines[0] and "--exist-ok" in lines[0], err


def test_explain_refuses_an_existing_png_and_folder_without_exist_ok(tiny, tmp_path: Path) -> None:
    image = sorted(tiny.images.iterdir())[0]
    png = tmp_path / "heat.png"
    png.write_bytes(b"earlier result")
    args = ("explain", image, "--model", tiny.checkpoint, "--out", png, "--device", "cpu")
    code, _, err = isnet(*args)
    _refused(code, err, png)
    assert png.read_bytes() == b"earlier result"
    code, _, err = isnet(*args, "--exist-ok")
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    folder = tmp_path / "heatmaps"
    folder.mkdir()
    (folder / "keep.txt").write_text("earlier")
    images = _two_images(tiny, tmp_path / "images")
    args = ("explain", images, "--model", tiny.checkpoint, "--out", folder, "--device", "cpu", "--no-progress")
    code, _, err = isnet(*args)
    _refused(code, err, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    code, _, err = isnet(*args, "--exist-ok")
    assert code == 0, err
    assert (folder / "summary.csv").is_file() and (folder / "keep.txt").read_text() == "earlier"


def test_explain_accepts_an_empty_out_folder(tiny, tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    images = _two_images(tiny, tmp_path / "images")
    code, _, err = isnet("explain", images, "--model", tiny.checkpoint, "--out", folder, "--no-progress")
    assert code == 0, err


@pytest.mark.parametrize(("command", "report"), [("evaluate", "report.json"), ("audit", "audit.json")])
def test_reports_refuse_a_non_empty_out_folder_without_exist_ok(tiny, tmp_path: Path, command, report) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("earlier")
    args = (command, tiny.manifest, "--model", tiny.checkpoint, "--out", out, "--device", "cpu", "--no-progress")
    code, _, err = isnet(*args)
    _refused(code, err, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    code, _, err = isnet(*args, "--exist-ok")
    assert code == 0, err
    assert (out / report).is_file() and (out / "notes.txt").read_text() == "earlier"
