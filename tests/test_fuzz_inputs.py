"""Hostile and broken inputs: a fast fuzz subset, the pixel limit, non-finite values, one-line errors.

The full run (over 500 cases) is `benchmarks/fuzz_inputs.py`; this subset keeps every named hostile
file of the issue and every eighth mutation, so CI sees each kind of corruption in well under a minute.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isnet_cli.errors import InputError
from isnet_cli.io.dicom import write_dicom
from isnet_cli.io.images import load_image
from isnet_cli.io.limits import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, max_pixels
from tests.fuzz import SHARED_DICOM, make_cases, png_claiming, run_cases


def test_fast_fuzz_subset_ends_in_images_or_one_line_errors(tmp_path: Path) -> None:
    cases = make_cases(tmp_path, seed=1, truncations=8, flips=4)
    subset = [c for i, c in enumerate(cases) if c.kind.startswith("special") or i % 8 == 0]
    tally = run_cases(subset, timeout=20.0)
    minimum = 60 if SHARED_DICOM.is_dir() else 30  # the shared real DICOMs, when present, add their mutations
    assert tally.tried == len(subset) >= minimum
    assert tally.counts["crash"] == 0 and tally.counts["hang"] == 0, tally.failures
    assert tally.counts["decoded"] > 0 and tally.counts["error"] > 0, tally.line()
    assert tally.peak_rss_mb < 1500, tally.line()
    outcomes = {kind: (outcome, detail) for kind, outcome, detail in tally.log}
    assert outcomes["special:bomb_40000.png"][0] == "error" and "pixel limit" in outcomes["special:bomb_40000.png"][1]
    assert outcomes["special:flat16.png"][0] == "decoded"
    assert outcomes["special:x.dcm"][0] == "error" and "x.dcm: not a file" in outcomes["special:x.dcm"][1]
    assert "non-finite" in outcomes["special:nan.mha"][1]


def test_pixel_limit_is_checked_from_the_header_and_configurable(tmp_path: Path, monkeypatch) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(9000, 9000))  # 81 MP claimed in 60 bytes: under Pillow's own guard
    with pytest.raises(InputError, match=r"bomb\.png: image of 9000 x 9000 = 81,000,000 pixels is above"):
        load_image(bomb)
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(small)
    dcm = write_dicom(tmp_path / "small.dcm", np.zeros((20, 30)))
    assert max_pixels() == DEFAULT_MAX_PIXELS and load_image(small).image.shape == (20, 30)
    monkeypatch.setenv(MAX_PIXELS_ENV, "599")
    for path in (small, dcm):
        with pytest.raises(
            InputError, match=rf"30 x 20 = 600 pixels is above the pixel limit \(599\).*{MAX_PIXELS_ENV}"
        ):
            load_image(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(InputError, match="not a positive integer"):
        load_image(small)


def test_nan_rescale_is_a_clear_error_not_a_black_image(tmp_path: Path) -> None:
    import pydicom

    path = write_dicom(tmp_path / "a.dcm", np.random.default_rng(0).random((8, 8)), bits=16)
    ds = pydicom.dcmread(path)
    with pytest.warns(UserWarning, match="Invalid value for VR DS"):
        ds.RescaleSlope = "NaN"
    ds.save_as(path)
    with pytest.raises(InputError, match=r"a\.dcm: the modality transform .*64 non-finite"):
        load_image(path)
