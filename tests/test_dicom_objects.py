"""DICOM in and out (the PACS round trip): lung masks read from DICOM SEG (written by `isnet segment
--format seg` or by another tool through highdicom), heatmaps written as Secondary Capture, predictions as a
Comprehensive SR, all re-read with pydicom/highdicom; bad inputs give one-line errors and exit code 2."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from isnet_cli.io.contract import InputContract
from isnet_cli.io.dataset import XrayDataset
from isnet_cli.io.dicom import write_dicom
from isnet_cli.io.images import load_image
from isnet_cli.io.manifest import read_dataset
from isnet_cli.io.masks import load_mask
from tests.tiny_models import isnet, shared_tiny_run

SIZE = 32
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
HEART = ("80891009", "Heart")
LEFT_LUNG = ("44029006", "Left lung")
RIGHT_LUNG = ("3341006", "Right lung")


def to_dicom(manifest: Path, out: Path, n: int | None = None) -> Path:
    """The phantoms of `manifest` as DICOM (CR, MONOCHROME2, 8-bit), with their PNG masks: a new manifest."""
    rows = list(csv.DictReader(manifest.open()))[:n]
    out.mkdir(parents=True, exist_ok=True)
    lines = ["image,mask,label"]
    for r in rows:
        image = load_image(manifest.parent / r["image"]).image
        dcm = write_dicom(out / (Path(r["image"]).stem + ".dcm"), image)
        lines.append(f"{dcm},{(manifest.parent / r['mask']).resolve()},{r['label']}")
    path = out / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def highdicom_seg(
    path: Path, sources: list[Path], segments: list[tuple[tuple[str, str], np.ndarray]], kind: str = "BINARY"
) -> Path:
    """A SEG made the way another tool would: highdicom, SNOMED CT codes, one frame per source image and
    segment. `segments`: ((code, meaning), masks (len(sources), H, W)) per segment; `kind`: BINARY (bool
    masks) or FRACTIONAL (probabilities in [0, 1])."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    datasets = []
    for s in sources:
        ds = pydicom.dcmread(s)
        for key in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName"):
            setattr(ds, key, ds.get(key, ""))
        ds.AccessionNumber, ds.StudyID = ds.get("AccessionNumber", ""), ds.get("StudyID", "")
        datasets.append(ds)
    descriptions = [
        hd.seg.SegmentDescription(
            i + 1,
            meaning,
            codes.SCT.Organ,
            hd.sr.CodedConcept(code, "SCT", meaning),
            hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, ((code, meaning), _) in enumerate(segments)
    ]
    pixels = np.stack([m for _, m in segments], axis=-1)  # (frames, H, W, segments)
    pixels = pixels.astype(np.uint8) if kind == "BINARY" else pixels.astype(np.float32)
    with warnings.catch_warnings():  # real files have one-component patient names, which highdicom warns about
        warnings.simplefilter("ignore", UserWarning)
        seg = hd.seg.Segmentation(
            datasets, pixels, kind, descriptions, hd.UID(), 1, hd.UID(), 1, "other tool", "annotator", "1", "0"
        )
    seg.save_as(path)
    return path


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from isnet_cli.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("dicom-phantoms"), n=12, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def dicoms(phantoms, tmp_path_factory) -> Path:
    """Manifest of the phantoms as DICOM files, each with its PNG mask."""
    return to_dicom(phantoms, tmp_path_factory.mktemp("dicoms"))


@pytest.fixture(scope="module")
def segmenter(phantoms, tmp_path_factory) -> Path:
    """A segmenter trained for one epoch: its masks are rough but not trivial, which is all a round trip needs."""
    out = tmp_path_factory.mktemp("segmenter")
    code, _, stderr = isnet(
        "segment", "train", phantoms, "--img-size", SIZE, "--epochs", 1, "--batch-size", 4, "--channels", "4,8",
        "--out", out, "--name", "lungs", "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    return out / "lungs"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory)


def rows_of(manifest: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(manifest.open()))


def one_line_error(code: int, stderr: str, *parts: str) -> None:
    """Exit code 2 and a single stderr line naming every one of `parts`."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, stderr
    assert len(lines) == 1, stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


# --- reading SEG -------------------------------------------------------------------------------------


def test_seg_from_another_tool_is_read_by_code_and_label(dicoms, tmp_path):
    """SEGs with heart, left and right lung segments (as another tool writes them with highdicom): the lungs
    are the union of the lung-coded segments, a label picks one segment; in a manifest, each image's SEG
    gives that image's mask through the training data path."""
    rows = rows_of(dicoms)[:2]
    lines = []
    for i, r in enumerate(rows):
        truth = load_mask(r["mask"], (SIZE, SIZE))
        left, right, heart = truth.copy(), truth.copy(), np.zeros_like(truth)
        left[:, SIZE // 2 :] = False
        right[:, : SIZE // 2] = False
        heart[20:26, 12:20] = True
        segments = [(HEART, heart[None]), (LEFT_LUNG, left[None]), (RIGHT_LUNG, right[None])]
        seg = highdicom_seg(tmp_path / f"seg{i}.dcm", [Path(r["image"])], segments)
        assert left.any() and right.any()
        assert np.array_equal(load_mask(seg, (SIZE, SIZE), image=r["image"]), truth)
        assert np.array_equal(load_mask(seg, (SIZE, SIZE), image=r["image"], segment="heart"), heart)
        assert np.array_equal(load_mask(seg, (SIZE, SIZE), image=r["image"], segment="Left lung"), left)
        soft = np.where(truth, 0.9, 0.3)[None]  # a probability map: lung where above one half
        fractional = highdicom_seg(tmp_path / f"frac{i}.dcm", [Path(r["image"])], [(LEFT_LUNG, soft)], "FRACTIONAL")
        assert pydicom.dcmread(fractional).SegmentationType == "FRACTIONAL"
        assert np.array_equal(load_mask(fractional, (SIZE, SIZE), image=r["image"]), truth)
        lines.append(f"{r['image']},{seg},{r['label']}\n")
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,mask,label\n" + "".join(lines))
    spec = read_dataset(manifest)
    ds = XrayDataset(spec.samples, spec.classes, InputContract(size=SIZE, resize="stretch"))
    for r, sample in zip(rows, spec.samples, strict=True):
        assert np.array_equal(ds.load_arrays(sample)[1], load_mask(r["mask"], (SIZE, SIZE)))
    # `isnet data check` reads them too, with the segment chosen the same way
    for segment, expected in ((None, 0), ("Heart", 0), ("Spleen", 2)):
        code, stdout, stderr = isnet(
            "data", "check", manifest, "--json", *(("--mask-segment", segment) if segment else ())
        )
        assert code == expected, stderr
        assert ("no segment labelled 'Spleen'" in stdout) == (segment == "Spleen")


def test_seg_errors_are_one_line_exit_2(dicoms, tiny, tmp_path):
    rows = rows_of(dicoms)
    first, other = Path(rows[0]["image"]), Path(rows[1]["image"])
    mask = load_mask(rows[0]["mask"], (SIZE, SIZE))[None]
    heart_only = highdicom_seg(tmp_path / "heart.dcm", [first], [(HEART, mask)])
    lungs_of_other = highdicom_seg(tmp_path / "other.dcm", [other], [(LEFT_LUNG, mask)])
    base = ("explain", first, "--model", tiny.checkpoint, "--out", tmp_path / "h.png", "--fail-fast", "--mask")
    code, _, stderr = isnet(*base, heart_only)
    one_line_error(code, stderr, str(heart_only), "no lung segment", "#1 'Heart' (Heart [SCT 80891009])")
    code, _, stderr = isnet(*base, heart_only, "--mask-segment", "Lungs")
    one_line_error(code, stderr, str(heart_only), "no segment labelled 'Lungs'", "--mask-segment")
    code, _, stderr = isnet(*base, lungs_of_other)
    one_line_error(code, stderr, str(lungs_of_other), "references another image", pydicom.dcmread(first).SOPInstanceUID)
    code, _, stderr = isnet(*base, heart_only, "--mask-segment", "Heart")
    assert code == 0, stderr  # the same SEG with its one segment chosen by label


# --- SEG out -----------------------------------------------------------------------------------------


def test_segment_format_seg_round_trip(dicoms, segmenter, tmp_path):
    """`isnet segment --format seg` on DICOM inputs: one SEG per image in one new Series of each image's study,
    coded lung, the model identified; read back by `isnet train`'s data path, the masks are exactly the PNG
    masks of the same segmenter; `isnet train` runs on the SEG manifest."""
    import highdicom as hd

    from isnet_cli.infer.onnx_runtime import model_id

    source = tmp_path / "nomask.csv"
    source.write_text("image,label\n" + "".join(f"{r['image']},{r['label']}\n" for r in rows_of(dicoms)))
    outs = {}
    for fmt in ("png", "seg"):
        outs[fmt] = tmp_path / fmt
        args = ("segment", source, "--model", segmenter, "--out", outs[fmt], "--qc", "keep", "--format", fmt)
        code, _, stderr = isnet(*args, "--device", "cpu", "--no-progress")
        assert code == 0, stderr
    png_rows, seg_rows = rows_of(outs["png"] / "manifest.csv"), rows_of(outs["seg"] / "manifest.csv")
    assert [r["image"] for r in png_rows] == [r["image"] for r in seg_rows] and len(seg_rows) >= 2
    assert all(r["mask"].endswith(".dcm") for r in seg_rows)
    contract = InputContract(size=SIZE)
    png_spec, seg_spec = read_dataset(outs["png"] / "manifest.csv"), read_dataset(outs["seg"] / "manifest.csv")
    png_ds = XrayDataset(png_spec.samples, png_spec.classes, contract)
    seg_ds = XrayDataset(seg_spec.samples, seg_spec.classes, contract)
    series: dict[str, set[str]] = {}
    fractions = []
    for png_sample, seg_sample in zip(png_spec.samples, seg_spec.samples, strict=True):
        png_mask = np.asarray(Image.open(png_sample.mask)) > 127
        fractions.append(png_mask.mean())
        assert np.array_equal(seg_ds.load_arrays(seg_sample)[1], png_ds.load_arrays(png_sample)[1])
        src = pydicom.dcmread(seg_sample.image)
        seg = pydicom.dcmread(seg_sample.mask)
        assert seg.SOPClassUID == SEG_STORAGE and seg.SegmentationType == "BINARY"
        assert np.array_equal(np.asarray(seg.pixel_array).reshape(png_mask.shape) > 0, png_mask)  # pydicom
        assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.PatientID == src.PatientID
        assert seg.SeriesInstanceUID != src.SeriesInstanceUID and seg.SOPInstanceUID != src.SOPInstanceUID
        assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
            src.SOPInstanceUID
        )
        series.setdefault(seg.StudyInstanceUID, set()).add(seg.SeriesInstanceUID)
        desc = hd.seg.segread(seg_sample.mask).get_segment_description(1)
        assert desc.segmented_property_type.value == "39607008" and desc.segment_label == "Lung"
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "isnet lung segmenter" and algorithm.AlgorithmVersion
        assert algorithm.AlgorithmParameters == f"model_id={model_id(segmenter / 'best.safetensors')}"
    assert all(len(s) == 1 for s in series.values())  # one Series per run and Study, none shared across studies
    assert len(set.union(*series.values())) == len(series)
    assert min(fractions) > 0 and max(fractions) < 1  # masks that are neither empty nor full: a real comparison
    train = ("train", outs["seg"] / "manifest.csv", "--arch", "tinycnn", "--img-size", SIZE, "--epochs", 1,
             "--batch-size", 4, "--cut", "1,25", "--out", tmp_path / "runs", "--device", "cpu",
             "--no-progress")  # fmt: skip
    code, _, stderr = isnet(*train, "--name", "heart", "--mask-segment", "Heart")
    one_line_error(
        code, stderr, "unusable training file", "no segment labelled 'Heart'", "#1 'Lung' (Lung [SCT 39607008])"
    )
    code, _, stderr = isnet(*train, "--name", "seg", "--mask-segment", "Lung")
    assert code == 0, stderr


def test_segment_anonymize_and_png_input(dicoms, segmenter, phantoms, tmp_path):
    image = Path(rows_of(dicoms)[0]["image"])
    out = tmp_path / "anon"
    code, _, stderr = isnet("segment", image, "--model", segmenter, "--out", out, "--format", "seg", "--anonymize")
    assert code == 0, stderr
    seg = pydicom.dcmread(next((out / "masks").glob("*.dcm")))
    src = pydicom.dcmread(image)
    assert str(src.PatientName) != "ANONYMIZED^" and src.PatientID != "ANONYMIZED"
    assert str(seg.PatientName) == "ANONYMIZED^" and seg.PatientID == "ANONYMIZED"
    assert seg.PatientIdentityRemoved == "YES" and seg.StudyInstanceUID == src.StudyInstanceUID
    png = phantoms.parent / rows_of(phantoms)[0]["image"]
    code, _, stderr = isnet("segment", png, "--model", segmenter, "--out", tmp_path / "x", "--format", "seg")
    one_line_error(code, stderr, str(png), "--format seg needs DICOM inputs")
    assert not (tmp_path / "x").exists()  # refused before any work


# --- Secondary Capture and SR out ----------------------------------------------------------------------


def check_derived(obj: pydicom.Dataset, src: pydicom.Dataset) -> None:
    """Same Patient and Study as the source, new Series and Instance."""
    assert obj.StudyInstanceUID == src.StudyInstanceUID
    assert str(obj.PatientName) == str(src.PatientName) and obj.PatientID == src.PatientID
    assert obj.SeriesInstanceUID != src.SeriesInstanceUID and obj.SOPInstanceUID != src.SOPInstanceUID
    assert obj.file_meta.MediaStorageSOPInstanceUID == obj.SOPInstanceUID


def test_explain_secondary_capture(dicoms, tiny, tmp_path):
    from isnet_cli.report.render import figure_shape

    rows = rows_of(dicoms)
    image = Path(rows[0]["image"])
    out = tmp_path / "heatmap.dcm"
    code, _, stderr = isnet("explain", image, "--model", tiny.checkpoint, "--mask", rows[0]["mask"], "--format",
                            "dcm", "--out", out)  # fmt: skip
    assert code == 0, stderr
    sc, src = pydicom.dcmread(out), pydicom.dcmread(image)
    assert sc.SOPClassUID == SC_STORAGE and sc.Modality == "OT"
    check_derived(sc, src)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPClassUID == src.SOPClassUID
    assert "LRP" in sc.DerivationDescription and sc.ImageType[0] == "DERIVED"
    assert "PatientBirthDate" in sc and not sc.PatientBirthDate  # Type 2: present, empty as in the source
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    rgb = sc.pixel_array
    assert rgb.shape == (*figure_shape(SIZE, SIZE), 3)
    # the burned-in colour bar (right of the image) holds saturated red and blue; the caption band dark text
    bar = rgb[:, -100:].reshape(-1, 3).astype(int)
    assert ((bar[:, 0] > 200) & (bar[:, 2] < 80)).any() and ((bar[:, 2] > 200) & (bar[:, 0] < 80)).any()
    assert (rgb[:40].min(axis=-1) < 80).sum() > 100
    # a folder: two images of one study and one of another: one new Series per Study, Instance Numbers 1, 2
    folder = tmp_path / "in"
    folder.mkdir()
    study = pydicom.dcmread(rows[0]["image"]).StudyInstanceUID
    for i, r in enumerate(rows[:3]):
        ds = pydicom.dcmread(r["image"])
        if i == 1:
            ds.StudyInstanceUID = study
        ds.save_as(folder / f"{i}.dcm")
    code, _, stderr = isnet("explain", folder, "--model", tiny.checkpoint, "--format", "dcm", "--out",
                            tmp_path / "many", "--anonymize", "--no-progress")  # fmt: skip
    assert code == 0, stderr
    written = [pydicom.dcmread(tmp_path / "many" / f"{i}.dcm") for i in range(3)]
    assert [d.StudyInstanceUID for d in written] == [study, study, pydicom.dcmread(rows[2]["image"]).StudyInstanceUID]
    assert written[0].SeriesInstanceUID == written[1].SeriesInstanceUID != written[2].SeriesInstanceUID
    assert [d.InstanceNumber for d in written] == [1, 2, 1] and len({d.SOPInstanceUID for d in written}) == 3
    assert all(str(d.PatientName) == "ANONYMIZED^" and d.PatientIdentityRemoved == "YES" for d in written)


def test_sc_for_png_input_is_refused(phantoms, tiny, tmp_path):
    png = phantoms.parent / rows_of(phantoms)[0]["image"]
    code, _, stderr = isnet("explain", png, "--model", tiny.checkpoint, "--format", "dcm", "--out", tmp_path / "h.dcm")
    one_line_error(code, stderr, str(png), "--format dcm needs DICOM inputs")
    assert not (tmp_path / "h.dcm").exists()


def test_predict_structured_report(dicoms, tiny, phantoms, tmp_path):
    import highdicom as hd

    image = Path(rows_of(dicoms)[0]["image"])
    out = tmp_path / "pred-sr.dcm"
    code, stdout, stderr = isnet("predict", image, "--model", tiny.checkpoint, "--sr", out, "--json")
    assert code == 0, stderr
    import json

    result = json.loads(stdout.strip().splitlines()[-1])
    sr, src = pydicom.dcmread(out), pydicom.dcmread(image)
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.Modality == "SR"
    check_derived(sr, src)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    items = {it.ConceptNameCodeSequence[0].CodeMeaning: it for it in sr.ContentSequence}
    assert items["Finding"].TextValue == result["predicted"]
    for name, p in result["probabilities"].items():
        value = float(items[f"Probability of {name}"].MeasuredValueSequence[0].NumericValue)
        assert value == pytest.approx(p, abs=1e-6)
    assert result["model_id"] in items["Algorithm Name"].TextValue and items["Algorithm Version"].TextValue
    assert items["Source of Measurement"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert isinstance(hd.sr.srread(out), hd.sr.ComprehensiveSR)
    png = phantoms.parent / rows_of(phantoms)[0]["image"]
    code, _, stderr = isnet("predict", png, "--model", tiny.checkpoint, "--sr", tmp_path / "x.dcm")
    one_line_error(code, stderr, str(png), "--sr needs DICOM inputs")


def test_real_radiographs_seg_round_trip(shared_data, tmp_path):
    """Real CR files (JPEG, JPEG 2000, no file meta): our SEG and another tool's SEG (highdicom, with the
    source's Pixel Spacing, which highdicom writes without Slice Thickness) both read back exactly."""
    from isnet_cli.io.dicom_out import write_seg

    for name in ("cr_chest_pa_mono2_jpeg_baseline_rsna.dcm", "cr_chest_pa_mono1_j2k_lossy_RG1_J2KI.dcm"):
        source = shared_data / "dicom" / name
        src = pydicom.dcmread(source, stop_before_pixels=True)
        shape = (int(src.Rows), int(src.Columns))
        mask = np.zeros(shape, bool)
        mask[shape[0] // 4 : 3 * shape[0] // 4, shape[1] // 5 : 2 * shape[1] // 5] = True
        ours = write_seg(tmp_path / f"ours-{name}", source, mask, "isnet lung segmenter", "0123456789ab", "0.1.0")
        assert np.array_equal(load_mask(ours, shape, image=source), mask)
        theirs = highdicom_seg(tmp_path / f"theirs-{name}", [source], [(RIGHT_LUNG, mask[None])])
        assert "PixelMeasuresSequence" in pydicom.dcmread(theirs).SharedFunctionalGroupsSequence[0]
        assert np.array_equal(load_mask(theirs, shape, image=source), mask)


def test_writers_do_not_echo_the_patient_name(dicoms, tmp_path, recwarn):
    """highdicom warns about one-component person names by quoting them: the writers silence that warning,
    which would print the patient's name to the terminal and logs."""
    from isnet_cli.io.dicom_out import write_prediction_sr, write_secondary_capture, write_seg

    ds = pydicom.dcmread(rows_of(dicoms)[0]["image"])
    ds.PatientName = "Smithson"
    source = tmp_path / "named.dcm"
    ds.save_as(source)
    write_seg(tmp_path / "seg.dcm", source, np.ones((SIZE, SIZE), bool), "isnet lung segmenter", "id", "0")
    write_secondary_capture(tmp_path / "sc.dcm", source, np.zeros((8, 8, 3), np.uint8), "test")
    write_prediction_sr(tmp_path / "sr.dcm", source, "a", {"a": 1.0}, "isnet classifier", "id", "0")
    assert str(pydicom.dcmread(tmp_path / "sr.dcm").PatientName) == "Smithson"
    assert not [w for w in recwarn if "Smithson" in str(w.message)]
