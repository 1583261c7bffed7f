"""PNG/JPEG/TIFF/NIfTI/MHA/NRRD decoding, masks, and preprocessing to the input contract."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from isnet_cli.errors import InputError
from isnet_cli.io.contract import InputContract
from isnet_cli.io.images import load_image
from isnet_cli.io.masks import EmptyMaskWarning, load_mask
from isnet_cli.io.preprocess import preprocess_array, preprocess_file, unletterbox


def test_png_8bit_exact(tmp_path):
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(arr).save(tmp_path / "a.png")
    d = load_image(tmp_path / "a.png")
    np.testing.assert_allclose(d.image, arr / 255.0, atol=1e-7)
    assert d.record["bits"] == 8


@pytest.mark.parametrize("top, bits", [(65535, 16), (4095, 12), (1000, 10)])
def test_png_16bit_full_precision(tmp_path, top, bits):
    """Every distinct 16-bit level survives; scaled by the bit depth that holds the image's maximum."""
    arr = np.linspace(0, top, 40 * 50).round().astype(np.uint16).reshape(40, 50)
    Image.fromarray(arr).save(tmp_path / "a.png")
    d = load_image(tmp_path / "a.png")
    np.testing.assert_allclose(d.image, arr / (2**bits - 1), rtol=0, atol=1e-6)
    assert len(np.unique(d.image)) == len(np.unique(arr))
    assert f"{bits}-bit max" in d.record["scaling"]


def test_tiff_16bit_and_jpeg(tmp_path):
    arr = (np.arange(30 * 20).reshape(30, 20) * 100).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.tif")
    np.testing.assert_allclose(load_image(tmp_path / "a.tif").image, arr / 65535.0, atol=1e-6)
    grad = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    Image.fromarray(grad).save(tmp_path / "a.jpg", quality=95)
    assert np.abs(load_image(tmp_path / "a.jpg").image - grad / 255.0).max() < 0.03


def test_rgb_to_grey(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    Image.fromarray(rgb).save(tmp_path / "c.png")
    d = load_image(tmp_path / "c.png")
    assert d.image.shape == (8, 8)
    assert d.image[0, 0] == pytest.approx((0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255, abs=1 / 255)
    assert "RGB -> grey" in d.record["colour"]


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_itk_formats_2d(tmp_path, suffix):
    arr = np.linspace(-1000, 1000, 24 * 32).reshape(24, 32).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / f"a{suffix}"))
    d = load_image(tmp_path / f"a{suffix}")
    np.testing.assert_allclose(d.image, (arr + 1000.0) / 2000.0, atol=1e-6)
    assert d.record["window_fallback"].endswith("minmax")


def test_itk_3d_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 8, 8), np.uint8)), str(tmp_path / "v.nii.gz"))
    with pytest.raises(InputError, match=r"v.nii.gz: image has shape \[3, 8, 8\]: only 2-D"):
        load_image(tmp_path / "v.nii.gz")


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(InputError, match=r"nothere\.png: file not found"):
        load_image(tmp_path / "nothere.png")
    (tmp_path / "x.xyz").write_text("hello")
    with pytest.raises(InputError, match=r"x.xyz: unsupported file type '.xyz'"):
        load_image(tmp_path / "x.xyz")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(InputError, match=r"broken\.png: cannot read image"):
        load_image(tmp_path / "broken.png")


def test_mask_binarised_and_nearest_resized(tmp_path):
    m = np.zeros((20, 40), np.uint8)
    m[5:15, 10:20] = 200
    m[0, 0] = 90  # below half of the maximum: background
    Image.fromarray(m).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png", (40, 80))
    assert mask.dtype == bool and mask.shape == (40, 80)
    assert mask.sum() == 4 * 10 * 10 and mask[10:30, 20:40].all() and not mask[0, 0]


def test_mask_in_nifti(tmp_path):
    m = np.zeros((10, 10), np.float32)
    m[2:5, 3:7] = 1.0
    sitk.WriteImage(sitk.GetImageFromArray(m), str(tmp_path / "m.nii.gz"))
    assert load_mask(tmp_path / "m.nii.gz", (10, 10)).sum() == 12


def test_mask_aspect_mismatch_and_empty(tmp_path):
    Image.fromarray(np.full((20, 20), 255, np.uint8)).save(tmp_path / "square.png")
    with pytest.raises(InputError, match=r"square.png: mask is 20x20 but its image is 30x20 \(aspect differs"):
        load_mask(tmp_path / "square.png", (20, 30))
    load_mask(tmp_path / "square.png", (40, 40))  # same aspect, other resolution: fine
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(InputError, match=r"empty\.png: mask is empty"):
        load_mask(tmp_path / "empty.png", (20, 20), required=True)
    with pytest.warns(EmptyMaskWarning):
        assert not load_mask(tmp_path / "empty.png", (20, 20), required=False).any()


def test_letterbox_geometry_and_unletterbox():
    h, w = 40, 80
    image = np.tile(np.linspace(0, 1, w, dtype=np.float32), (h, 1))
    mask = np.zeros((h, w), bool)
    mask[10:30, 20:60] = True
    x, m, rec = preprocess_array(image, mask, InputContract(size=32, channels=3, low=-1.0, high=1.0))
    assert x.shape == (3, 32, 32) and m.shape == (1, 32, 32)
    assert rec["resized_shape"] == [16, 32] and rec["pad"] == [8, 0]
    assert (x[:, :8] == -1.0).all() and (x[:, 24:] == -1.0).all()  # padding is air = low
    assert m[0, :8].sum() == 0 and m[0, 12:20, 8:24].all()  # mask follows the image
    back = unletterbox((x[0] + 1) / 2, rec)
    assert back.shape == (h, w)
    assert np.abs(back - image).mean() < 0.02


def test_stretch_fills_the_square():
    image = np.ones((40, 80), np.float32)
    x, _, rec = preprocess_array(image, None, InputContract(size=32, resize="stretch"))
    assert rec["pad"] == [0, 0] and (x == 1.0).all()


def test_preprocess_file_records_decode_and_resize(tmp_path):
    Image.fromarray(np.full((30, 60), 128, np.uint8)).save(tmp_path / "i.png")
    Image.fromarray(np.full((15, 30), 255, np.uint8)).save(tmp_path / "m.png")
    p = preprocess_file(tmp_path / "i.png", InputContract(size=24), tmp_path / "m.png", mask_required=True)
    assert p.x.shape == (1, 24, 24) and p.mask.shape == (1, 24, 24) and p.image.shape == (30, 60)
    assert p.record["format"] == "pillow" and p.record["original_shape"] == [30, 60]
    assert p.mask.sum() == 24 * 12
