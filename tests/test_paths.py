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
