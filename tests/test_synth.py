"""Synthetic phantoms: deterministic, balanced, the label inside the lungs, the marker outside them."""

from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest

from isnet_cli.errors import InputError
from isnet_cli.io.images import load_image
from isnet_cli.io.masks import load_mask
from isnet_cli.synth import make_phantom, marker_probability, synthesize


def _rows(manifest):
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))


def test_deterministic_for_a_seed(tmp_path):
    a = synthesize(tmp_path / "a", n=6, size=32, bias=0.5, seed=7)
    b = synthesize(tmp_path / "b", n=6, size=32, bias=0.5, seed=7)
    c = synthesize(tmp_path / "c", n=6, size=32, bias=0.5, seed=8)
    assert a.read_text() == b.read_text()
    for row in _rows(a):
        assert (a.parent / row["image"]).read_bytes() == (b.parent / row["image"]).read_bytes()
    first = _rows(a)[0]["image"]
    assert not np.array_equal(load_image(a.parent / first).image, load_image(c.parent / _rows(c)[0]["image"]).image)


def test_label_lives_only_inside_the_lungs():
    """Same stream, label 0 vs 1: the images differ only inside the lung mask, and there they get brighter."""
    normal = make_phantom(np.random.default_rng([0, 5]), 64, 0, False)
    sick = make_phantom(np.random.default_rng([0, 5]), 64, 1, False)
    assert np.array_equal(normal.mask, sick.mask)
    diff = sick.image - normal.image
    assert np.abs(diff[~normal.mask]).max() == 0.0
    assert diff[normal.mask].max() > 0.15 and diff.min() >= 0.0


def test_marker_outside_the_body_and_lungs():
    plain = make_phantom(np.random.default_rng([0, 9]), 64, 1, False)
    marked = make_phantom(np.random.default_rng([0, 9]), 64, 1, True)
    changed = marked.image != plain.image
    assert changed.sum() >= 25  # a visible glyph
    assert not (changed & marked.mask).any()
    assert marked.image[changed].min() > 0.85  # bright: easy to learn as a shortcut


@pytest.mark.parametrize(
    "bias, expect",
    [(1.0, {"normal": 0, "opacity": 1}), ("flip", {"normal": 1, "opacity": 0}), (None, {"normal": 0, "opacity": 0})],
)
def test_bias_controls_the_marker(tmp_path, bias, expect):
    rows = _rows(synthesize(tmp_path, n=20, size=32, bias=bias, seed=0))
    assert sum(r["label"] == "normal" for r in rows) == 10  # balanced
    assert all(int(r["marker"]) == expect[r["label"]] for r in rows)


def test_bias_half_is_uncorrelated(tmp_path):
    rows = _rows(synthesize(tmp_path, n=200, size=16, bias=0.5, seed=0))
    rate = {c: np.mean([int(r["marker"]) for r in rows if r["label"] == c]) for c in ("normal", "opacity")}
    assert 0.35 < rate["normal"] < 0.65 and 0.35 < rate["opacity"] < 0.65
    assert marker_probability(0.8, 1) == 0.8 and marker_probability(0.8, 0) == pytest.approx(0.2)


def test_masks_and_more_classes(tmp_path):
    manifest = synthesize(tmp_path, n=9, size=40, classes=("normal", "opacity", "effusion"), seed=2)
    rows = _rows(manifest)
    assert sorted({r["label"] for r in rows}) == ["effusion", "normal", "opacity"]
    for r in rows:
        image = load_image(tmp_path / r["image"]).image
        mask = load_mask(tmp_path / r["mask"], image.shape)
        assert image.shape == (40, 40) and 0.1 < mask.mean() < 0.5


def test_png_16bit_and_dicom_output(tmp_path):
    png = synthesize(tmp_path / "p16", n=2, size=32, bits=16, seed=0)
    assert load_image(png.parent / _rows(png)[0]["image"]).record["scaling"].startswith("16-bit max")
    dcm = synthesize(tmp_path / "d", n=2, size=32, fmt="dcm", photometric="MONOCHROME1", bits=12, compression="rle")
    again = synthesize(tmp_path / "d2", n=2, size=32, fmt="dcm", photometric="MONOCHROME1", bits=12, compression="rle")
    first = _rows(dcm)[0]["image"]
    assert (dcm.parent / first).read_bytes() == (again.parent / first).read_bytes()  # UIDs derive from the pixels
    ds = pydicom.dcmread(dcm.parent / first)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 12
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless


def test_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="at least two distinct"):
        synthesize(tmp_path, n=2, classes=("only",))
    with pytest.raises(InputError, match="compression applies to DICOM only"):
        synthesize(tmp_path, n=2, compression="rle")
    with pytest.raises(InputError, match=r"bias 1\.5 is outside"):
        synthesize(tmp_path, n=2, bias="1.5")
