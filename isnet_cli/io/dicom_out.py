"""DICOM objects written back for a PACS: lung masks (SEG), heatmap overlays (Secondary Capture) and
predictions (Comprehensive SR), built with highdicom so that viewers file them next to their source image.

Every object keeps the source's Study (same Study Instance UID), gets a new Series and SOP Instance UID,
and references the source image by SOP Class and Instance UID. What is copied from the source is only what
DICOM needs for the object to sit in that study: the Patient module (name, ID, birth date, sex) and the
General Study module (Study Instance UID, date, time, ID, accession number, referring physician). Nothing
else of the source header is copied: the writers hand highdicom a reduced copy (`reference_dataset`).

`anonymize=True` replaces those attributes: patient name and ID become "ANONYMIZED", the others are
emptied (they are Type 2: present, no value), and Patient Identity Removed = YES with a De-identification
Method saying what was kept: the source's Study, Series and SOP Instance UIDs (without them the object
cannot reference its source or sit in its study).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli.errors import InputError
from isnet_cli.io.atomic import atomic_write_bytes
from isnet_cli.io.decoded import brief
from isnet_cli.io.images import detect_format

MANUFACTURER = "isnet"
ANONYMIZED = "ANONYMIZED"
ANONYMIZED_NAME = "ANONYMIZED^"  # a person name: the trailing caret marks a single-component name
# Patient and General Study attributes that are copied from the source (Type 2 where missing: empty).
PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
# Attributes of the source image that highdicom needs to reference it and to size the objects. Pixel spacing
# is left out: a Secondary Capture figure has another geometry, and highdicom 0.28 writes a radiograph's
# spacing into a SEG as a Pixel Measures Sequence without Slice Thickness that it then cannot read back.
IMAGE_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PatientOrientation",
    "SpecificCharacterSet",
)
# De-identification Method is a LO (64 characters at most): the details are in this module's docstring.
DEIDENTIFICATION = "isnet --anonymize: patient/study identifiers replaced, UIDs kept"
# Series numbers of what isnet writes, so that a viewer lists them after the acquisition's own series.
SERIES_NUMBERS = {"seg": 9001, "sc": 9002, "sr": 9003}
# A private coding scheme for the class probabilities of an SR (PS3.16 8.1: designators starting "99").
ISNET_SCHEME = "99ISNET"


def new_uid() -> str:
    """A new globally unique UID (highdicom's root); one per written Series or SOP Instance."""
    import highdicom as hd

    return str(hd.UID())


class RunSeries:
    """The Series of one run's objects: one new Series per source Study (a Series belongs to exactly one
    Study), with Instance Numbers 1, 2, ... in the order written."""

    def __init__(self) -> None:
        self._series: dict[str, tuple[str, int]] = {}

    def next(self, study_uid: str) -> tuple[str, int]:
        """(Series Instance UID, Instance Number) of the next object in `study_uid`."""
        uid, count = self._series.get(study_uid, (new_uid(), 0))
        self._series[study_uid] = (uid, count + 1)
        return uid, count + 1


def require_dicom(paths: Sequence[Path], what: str) -> None:
    """Refuse, before any work, inputs that a derived DICOM object cannot reference (PNG, NIfTI, ...):
    one line naming the first of them and the fix."""
    others = [p for p in paths if detect_format(p) != "dicom"]
    if others:
        more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
        raise InputError(
            others[0],
            f"{what} needs DICOM inputs; this is a {others[0].suffix or 'suffix-less'} file{more}",
            "give the DICOM images, or write PNG output",
        )


def read_source(path: str | Path, what: str) -> Any:
    """The header of the DICOM image that `what` (e.g. "--format seg") derives from; InputError for any
    other input, naming the file and what to do instead."""
    import pydicom

    path = Path(path)
    require_dicom([path], what)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:  # pydicom raises many types for broken files
        raise InputError(path, f"cannot read the DICOM header ({brief(exc)})") from None
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Rows", "Columns") if k not in ds]
    if missing:
        raise InputError(
            path,
            f"{what}: the source DICOM has no {', '.join(missing)}",
            "a derived object must reference its source image by these",
        )
    return ds


def reference_dataset(source: Any, anonymize: bool) -> Any:
    """A reduced copy of the source header for highdicom: image and reference attributes, the Patient and
    General Study attributes (Type 2 ones present even when the source lacks them), anonymized on request."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    for key in IMAGE_ATTRIBUTES:
        if key in source:
            setattr(ds, key, source[key].value)
    if "SeriesInstanceUID" not in ds:
        ds.SeriesInstanceUID = new_uid()  # old files without one: highdicom needs a series to reference
    for key in PATIENT_STUDY:
        setattr(ds, key, "" if anonymize else source.get(key, ""))
    if anonymize:
        ds.PatientName = ANONYMIZED_NAME
        ds.PatientID = ANONYMIZED
    return ds


def _quietly(factory: Callable[..., Any], **kwargs: Any) -> Any:
    """Build a highdicom object without its person-name warning, which quotes the name: it would print the
    patient's name to the terminal and to logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*intended person name", category=UserWarning)
        return factory(**kwargs)


def _mark_anonymized(obj: Any, anonymize: bool) -> None:
    if anonymize:
        obj.PatientIdentityRemoved = "YES"
        obj.DeidentificationMethod = DEIDENTIFICATION


def _source_image_item(source: Any) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def _save(obj: Any, path: Path) -> Path:
    """Part 10 file (preamble, file meta), written atomically like every other isnet output."""
    buffer = io.BytesIO()
    obj.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_seg(
    path: str | Path,
    source_path: str | Path,
    mask: np.ndarray,
    model_name: str,
    model_id: str,
    version: str,
    anonymize: bool = False,
    series: RunSeries | None = None,
) -> Path:
    """A binary DICOM SEG of `mask` (bool (H, W), the source's geometry): one segment, coded SNOMED CT
    "Lung" (organ), algorithm identification `model_name` / `version` with the model id as a parameter.
    `series`: the run's Series (default: a new Series for this object alone)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    source = read_source(source_path, "--format seg")
    if mask.shape != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"mask {mask.shape} does not match the source's {source.Rows}x{source.Columns} pixels")
    series_uid, number = (series or RunSeries()).next(str(source.StudyInstanceUID))
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=version,
        parameters={"model_id": model_id},
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Lung",
        segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Lung,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = _quietly(
        hd.seg.Segmentation,
        source_images=[reference_dataset(source, anonymize)],
        pixel_array=mask[None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS["seg"],
        sop_instance_uid=new_uid(),
        instance_number=number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name,
        software_versions=version,
        device_serial_number=model_id,
        series_description="isnet lung mask",
        omit_empty_frames=False,  # an empty mask is still an answer about this image
    )
    _mark_anonymized(seg, anonymize)
    return _save(seg, Path(path))


def write_secondary_capture(
    path: str | Path,
    source_path: str | Path,
    rgb: np.ndarray,
    description: str,
    anonymize: bool = False,
    series: RunSeries | None = None,
) -> Path:
    """An RGB Secondary Capture of `rgb` (uint8 (H, W, 3), the rendered figure with its burned-in colour bar
    and caption) in the source's study, with a Source Image Sequence and Derivation Description pointing at it.
    `series`: the run's Series (default: a new Series for this object alone).

    Burned In Annotation is NO: the burned-in text is the caption and the colour bar, nothing that identifies
    the patient (the caption does not name the file).
    """
    import highdicom as hd

    source = read_source(source_path, "--format dcm")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {rgb.dtype} {rgb.shape}")
    series_uid, number = (series or RunSeries()).next(str(source.StudyInstanceUID))
    orientation = source.get("PatientOrientation")
    has_orientation = orientation is not None and len(orientation) == 2
    sc = _quietly(
        hd.sc.SCImage.from_ref_dataset,
        ref_dataset=reference_dataset(source, anonymize),
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS["sc"],
        sop_instance_uid=new_uid(),
        instance_number=number,
        manufacturer=MANUFACTURER,
        # highdicom insists on an orientation; where the source has none, the Type 2 attribute is emptied below.
        patient_orientation=tuple(orientation) if has_orientation else ("L", "F"),
    )
    if not has_orientation:
        sc.PatientOrientation = ""
    sc.SeriesDescription = "isnet LRP heatmap, not for diagnosis"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = description[:1024]
    sc.SourceImageSequence = [_source_image_item(source)]
    sc.BurnedInAnnotation = "NO"
    _mark_anonymized(sc, anonymize)
    return _save(sc, Path(path))


def write_prediction_sr(
    path: str | Path,
    source_path: str | Path,
    predicted: str,
    probabilities: Mapping[str, float],
    model_name: str,
    model_id: str,
    version: str,
    anonymize: bool = False,
) -> Path:
    """A Comprehensive SR of one prediction: root container "Finding" holding the predicted class (TEXT), one
    NUM probability per class (private codes, scheme 99ISNET, unit UCUM "1"), the algorithm name and version
    (with the model id), and the source image (IMAGE, "Source of Measurement")."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    source = read_source(source_path, "--sr")
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    root = hd.sr.ContainerContentItem(name=codes.DCM.Finding, template_id=None)
    items: list[Any] = [
        hd.sr.TextContentItem(codes.DCM.Finding, predicted, relationship_type=contains),
        *_probability_items(probabilities, contains),
        hd.sr.TextContentItem(
            codes.DCM.AlgorithmName, f"{model_name} (model id {model_id})", relationship_type=contains
        ),
        hd.sr.TextContentItem(codes.DCM.AlgorithmVersion, version, relationship_type=contains),
        hd.sr.ImageContentItem(
            name=codes.DCM.SourceOfMeasurement,
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
            relationship_type=contains,
        ),
    ]
    root.ContentSequence = items
    evidence = reference_dataset(source, anonymize)
    sr = _quietly(
        hd.sr.ComprehensiveSR,
        evidence=[evidence],
        content=root,
        series_instance_uid=new_uid(),
        series_number=SERIES_NUMBERS["sr"],
        sop_instance_uid=new_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # a model output, not verified by a reader
    )
    sr.SeriesDescription = "isnet prediction, not for diagnosis"
    _mark_anonymized(sr, anonymize)
    return _save(sr, Path(path))


def _probability_items(probabilities: Mapping[str, float], relationship: Any) -> Sequence[Any]:
    """NUM items, one per class: concept "Probability of <class>" (99ISNET code P<index>), value in [0, 1]."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    items = []
    for i, (name, p) in enumerate(probabilities.items()):
        concept = hd.sr.CodedConcept(
            value=f"P{i}", scheme_designator=ISNET_SCHEME, meaning=f"Probability of {name}"[:64]
        )
        items.append(hd.sr.NumContentItem(concept, float(p), codes.UCUM.NoUnits, relationship_type=relationship))
    return items
