"""DICOM decoding: real files (modality/VOI LUTs, MONOCHROME1, no meta, codecs) and files the project writes."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from isnet_cli.errors import InputError
from isnet_cli.io.dicom import write_dicom
from isnet_cli.io.images import load_image
from isnet_cli.synth import make_phantom

REAL = {
    "cr_chest_mono1_raw_nometa_CR-MONO1-10-chest.dcm": (440, 440),
    "cr_chest_pa_mono1_j2k_lossy_RG1_J2KI.dcm": (1955, 1841),
    "cr_chest_pa_mono2_jpeg_baseline_rsna.dcm": (1024, 1024),
    "cr_teeth_mono1_jpeg_lossless_modality_lut_seq.dcm": (1576, 1976),
    "ot_voi_lut_seq_test_vlut_04.dcm": (512, 512),
}
CHESTS = [name for name in REAL if name.startswith("cr_chest")]


@pytest.fixture(scope="module")
def dicom_dir(shared_data):
    return shared_data / "dicom"


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_dicom_decodes_to_unit_range(dicom_dir, name):
    d = load_image(dicom_dir / name)
    assert d.image.shape == REAL[name]
    assert d.image.dtype == np.float32
    assert d.image.min() >= 0.0 and d.image.max() <= 1.0
    assert d.image.std() > 0.05  # a real picture, not a constant
    assert d.record["format"] == "dicom"
    assert d.record["inverted"] == (d.record["photometric"] == "MONOCHROME1")


@pytest.mark.parametrize("name", CHESTS)
def test_chest_lungs_darker_than_spine(dicom_dir, name):
    """Air dark in every output: the lung fields are darker than the spine/mediastinum (MONOCHROME1 included)."""
    im = load_image(dicom_dir / name).image
    h, w = im.shape
    rows = slice(int(0.3 * h), int(0.6 * h))
    lungs = np.concatenate(
        [im[rows, int(0.2 * w) : int(0.35 * w)].ravel(), im[rows, int(0.65 * w) : int(0.8 * w)].ravel()]
    )
    spine = im[rows, int(0.46 * w) : int(0.54 * w)]
    assert lungs.mean() < spine.mean() - 0.2


def _expected_from_voi_lut(path) -> np.ndarray:
    """Independent numpy VOI LUT: out = LUT[clip(stored - first, 0, n - 1)], scaled by the LUT's min..max."""
    ds = pydicom.dcmread(path)
    item = ds.VOILUTSequence[0]
    n, first, _bits = (int(v) for v in item.LUTDescriptor)
    lut = np.asarray(item.LUTData, dtype=np.float64)
    stored = ds.pixel_array.astype(np.int64)
    expected = lut[np.clip(stored - first, 0, n - 1)]
    return (expected - lut.min()) / (lut.max() - lut.min())


def test_voi_lut_sequence_matches_lut(dicom_dir, tmp_path):
    path = dicom_dir / "ot_voi_lut_seq_test_vlut_04.dcm"
    d = load_image(path)
    assert d.record["voi"] == "VOI LUT sequence"
    np.testing.assert_allclose(d.image, _expected_from_voi_lut(path), atol=1e-6)
    # The file's LUT is linear; a non-linear LUT with an offset first entry must be followed as well.
    ds = pydicom.dcmread(path)
    item = ds.VOILUTSequence[0]
    item.LUTDescriptor = [200, 16, 16]
    item.LUTData = [round(4095 * (i / 199) ** 2.2) for i in range(200)]
    bent = tmp_path / "gamma_lut.dcm"
    ds.save_as(bent)
    d2 = load_image(bent)
    expected = _expected_from_voi_lut(bent)
    np.testing.assert_allclose(d2.image, expected, atol=1e-6)
    assert np.abs(d2.image - d.image).max() > 0.2  # really different from the linear LUT
    assert (d2.image == 0).mean() > 0.05 and (d2.image == 1).mean() > 0.05  # clipped below first / above last


def test_modality_lut_sequence_then_minmax_inverted(dicom_dir):
    """Teeth file: Modality LUT Sequence (rescale present too, LUT wins), no window -> minmax, MONOCHROME1 inverted."""
    path = dicom_dir / "cr_teeth_mono1_jpeg_lossless_modality_lut_seq.dcm"
    d = load_image(path)
    ds = pydicom.dcmread(path)
    item = ds.ModalityLUTSequence[0]
    n, first, _bits = (int(v) for v in item.LUTDescriptor)
    raw = item.LUTData  # OW: raw little-endian bytes
    lut = np.frombuffer(raw, "<u2").astype(np.float64) if isinstance(raw, bytes) else np.asarray(raw, np.float64)
    assert lut.size == n
    values = lut[np.clip(ds.pixel_array.astype(np.int64) - first, 0, n - 1)]
    expected = 1.0 - (values - values.min()) / (values.max() - values.min())
    assert d.record["modality_lut"].startswith("modality LUT sequence")
    assert d.record["window_fallback"].startswith("no VOI LUT or window")
    assert d.record["transfer_syntax_uid"] == "1.2.840.10008.1.2.4.70"  # JPEG Lossless SV1
    np.testing.assert_allclose(d.image, expected, atol=1e-6)


def test_file_without_meta_is_read_with_force(dicom_dir):
    d = load_image(dicom_dir / "cr_chest_mono1_raw_nometa_CR-MONO1-10-chest.dcm")
    assert d.record["preamble"] is False and d.record["read_with_force"] is True
    assert d.record["transfer_syntax_inferred"] is True
    assert d.record["transfer_syntax"] == "Implicit VR Little Endian"
    assert d.record["voi"].startswith("window center=550 width=1024")


def test_window_policies(dicom_dir):
    path = dicom_dir / "cr_chest_pa_mono1_j2k_lossy_RG1_J2KI.dcm"
    minmax = load_image(path, window="minmax")
    pct = load_image(path, window="percentile", percentiles=(1.0, 99.0))
    assert minmax.record["voi"] == "minmax" and minmax.image.min() == 0.0 and minmax.image.max() == 1.0
    # clipping at the 1st/99th percentiles saturates about 1% of the pixels at each end
    assert 0.005 < (pct.image == 0.0).mean() < 0.02
    assert 0.005 < (pct.image == 1.0).mean() < 0.02


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    return make_phantom(np.random.default_rng(3), 48, 1, True).image


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("compression", [None, "rle", "jpeg2000"])
def test_written_dicom_round_trip_lossless(tmp_path, phantom, photometric, bits, compression):
    path = write_dicom(tmp_path / "p.dcm", phantom, photometric=photometric, bits=bits, compression=compression)
    d = load_image(path)
    quantised = np.round(phantom * (2**bits - 1)) / (2**bits - 1)
    np.testing.assert_allclose(d.image, quantised, atol=1e-6)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == photometric and ds.BitsStored == bits
    assert d.record["inverted"] == (photometric == "MONOCHROME1")


def test_written_dicom_round_trip_lossy_jpeg2000(tmp_path, phantom):
    path = write_dicom(tmp_path / "p.dcm", phantom, photometric="MONOCHROME1", bits=12, compression="jpeg2000-lossy")
    d = load_image(path)
    err = np.abs(d.image - phantom)
    assert d.record["transfer_syntax_uid"] == "1.2.840.10008.1.2.4.91"
    assert err.mean() < 0.01 and err.max() < 0.06  # PSNR target 45 dB


def test_jpegls_needs_its_plugin(tmp_path, phantom):
    from pydicom.pixels import get_encoder
    from pydicom.uid import JPEGLSLossless

    if get_encoder(JPEGLSLossless).is_available:
        pytest.skip("pyjpegls installed: JPEG-LS can be encoded here")
    with pytest.raises(InputError, match="pyjpegls"):
        write_dicom(tmp_path / "p.dcm", phantom, compression="jpegls")


def _plain_dataset(arr: np.ndarray, **extra) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape[-3:-1] if arr.ndim == 4 or extra.get("SamplesPerPixel", 1) > 1 else arr.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = arr.tobytes()
    return ds


def test_pixel_padding_is_air_and_excluded_from_minmax(tmp_path):
    arr = np.full((20, 30), 1000, np.uint16)
    arr[5:15, 5:25] = np.linspace(1000, 2000, 20, dtype=np.uint16)[None, :]
    arr[:, :3] = 65535  # padding, far above the data
    path = tmp_path / "pad.dcm"
    _plain_dataset(arr, PixelPaddingValue=65535, PhotometricInterpretation="MONOCHROME1").save_as(path)
    d = load_image(path, window="minmax")
    assert d.record["padding_pixels"] == 60
    assert (d.image[:, :3] == 0.0).all()  # padding -> air (dark) even after the MONOCHROME1 inversion
    # min-max over the real data only: 1000 -> 1 after inversion, 2000 -> 0
    assert d.image[0, 10] == pytest.approx(1.0) and d.image[10, 24] == pytest.approx(0.0)


def test_multiframe_and_colour_are_refused(tmp_path):
    frames = np.zeros((3, 8, 8), np.uint16)
    _plain_dataset(frames, NumberOfFrames=3).save_as(tmp_path / "multi.dcm")
    with pytest.raises(InputError, match=r"multi.dcm: multi-frame DICOM \(3 frames\) is not supported"):
        load_image(tmp_path / "multi.dcm")
    rgb = np.zeros((8, 8, 3), np.uint8)
    ds = _plain_dataset(rgb, SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.save_as(tmp_path / "rgb.dcm")
    with pytest.raises(InputError, match=r"rgb.dcm: colour DICOM \(RGB, 3 samples per pixel\)"):
        load_image(tmp_path / "rgb.dcm")


def test_truncated_and_fake_dicom_give_one_line_errors(tmp_path, phantom):
    good = write_dicom(tmp_path / "good.dcm", phantom, bits=16)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size - 1500])
    fake = tmp_path / "notes.dcm"
    fake.write_text("this is a text file, not an image\n")
    for path in (truncated, fake):
        with pytest.raises(InputError) as err:
            load_image(path)
        message = str(err.value)
        assert message.startswith(str(path) + ": ") and "\n" not in message


def test_several_windows_use_the_first(tmp_path, phantom):
    path = write_dicom(tmp_path / "w.dcm", phantom, bits=8)
    ds = pydicom.dcmread(path)
    ds.WindowCenter = [100, 128]
    ds.WindowWidth = [50, 256]
    ds.WindowCenterWidthExplanation = ["LUNG", "FULL"]
    ds.save_as(path)
    d = load_image(path)
    assert d.record["voi"].startswith("window center=100 width=50") and d.record["window_explanation"] == "LUNG"
    stored = np.round(phantom * 255)
    expected = np.clip((stored - 99.5) / 49 + 0.5, 0, 1)  # PS3.3 C.11.2.1.2.1, LINEAR
    np.testing.assert_allclose(d.image, expected, atol=1e-6)
