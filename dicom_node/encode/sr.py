"""TID 1500 Measurement Report (Comprehensive SR) on the segments of a SEG.

Per structure: volume (ml), mean and standard deviation of attenuation (HU), each
referencing its SEG segment. A structure cut by the edge of the scanned range (or field)
carries a qualitative evaluation saying so (local coding scheme ``99DICOMNODE``,
as DICOM allows for concepts the standard lacks), so its volume is never read as
a whole-organ volume.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import RE_VALID_UID, generate_uid

from dicom_node import MANUFACTURER, __version__
from dicom_node.encode.codes import structure_codes
from dicom_node.encode.copied import checked_sources
from dicom_node.encode.measurements import StructureMeasurement
from dicom_node.encode.seg import Algorithm, EncodedSegmentation
from dicom_node.encode.sources import RESULT_CHARACTER_SET
from dicom_node.receive.storage import fsync_folder, is_disk_full

MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
HOUNSFIELD_UNIT = hd.sr.CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
ATTENUATION_COEFFICIENT = hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient")
SCAN_COVERAGE = hd.sr.CodedConcept("SCANCOVERAGE", "99DICOMNODE", "Coverage of structure by scan")
CUT_BY_SCAN_EDGE = hd.sr.CodedConcept("PARTIAL", "99DICOMNODE", "Structure cut by edge of scanned range")
WITHIN_SCAN = hd.sr.CodedConcept("COMPLETE", "99DICOMNODE", "Structure within scanned range")
CT_PROCEDURE = hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region")
"""Procedure reported: a member of CID 100 (Quantitative Diagnostic Imaging Procedures), as TID 1500 asks."""
DEVICE_UID_FILE = "device-observer-uid"
"""In the storage folder: the node's Device Observer UID, made once (:func:`node_device_uid`)."""
STANDARD_MEANINGS = {
    ("121232", "DCM"): "Source series for segmentation",  # TID 1411's spelling (pydicom's codes capitalise it)
}
"""Code meanings as the templates spell them, where the code dictionaries differ."""


def encode_measurement_report(
    segmentation: EncodedSegmentation,
    source_images: Sequence[Dataset],
    measurements: Sequence[StructureMeasurement],
    algorithm: Algorithm,
    *,
    series_number: int = 9702,
    notes: list[str] | None = None,
    previous_versions: Sequence[Dataset] = (),
    partial: bool = False,
    not_found: Sequence[str] = (),
    device_uid: str | None = None,
) -> hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR:
    """The SR for ``measurements`` (by label value), referencing ``segmentation``'s segments.

    Written as Comprehensive SR, which archives that predate Comprehensive 3D SR accept too; as Comprehensive
    3D SR only if its content holds 3D spatial coordinates (SCOORD3D), which Comprehensive SR cannot carry.

    ``device_uid`` is the Device Observer UID: the node's (:func:`node_device_uid`), the same in all its SRs;
    without it (a caller that is no node), a new UID.

    ``partial`` (the result covers less than the whole series) makes its Completion Flag PARTIAL.
    ``not_found`` (the structures the model looks for that have no voxel in this series) become a second
    Comment, so a reader tells "not found" from "not looked for".

    ``notes`` (the job's warnings) become one TEXT content item "Comment" under the
    report's root, so a reader of the SR sees what the result does not cover. A patient or study value of the
    sources that breaks its VR is not copied as it is (:func:`~dicom_node.encode.copied.checked_source`): each
    adds a sentence to ``notes`` (the list is extended in place) before the comment is written.
    ``previous_versions`` (headers of the SRs this one replaces) go into the
    Predecessor Documents Sequence (0040,A360).
    """
    source_images = checked_sources(source_images, notes)
    by_label = {m.label: m for m in measurements}
    seg = segmentation.dataset
    groups = []
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        label = segmentation.segment_classes.get(number)
        if label is None or label not in by_label:
            continue
        groups.append(_structure_group(seg, item, number, by_label[label], algorithm))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid or generate_uid(),
        name="dicom-node",
        manufacturer_name=MANUFACTURER,
        model_name=algorithm.name[:64],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=None,
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device
            ),
        ),
        procedure_reported=CT_PROCEDURE,
        imaging_measurements=groups,
    )
    if notes:
        report[0].ContentSequence.append(note_item(notes))
    if not_found:
        report[0].ContentSequence.append(not_found_item(not_found))
    document = hd.sr.Comprehensive3DSR if holds_3d_coordinates(report[0]) else hd.sr.ComprehensiveSR
    sr = document(
        evidence=[*source_images, seg],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=not partial,
        record_evidence=True,
        specific_character_set=RESULT_CHARACTER_SET,
        previous_versions=list(previous_versions) or None,
    )
    sr.SeriesDescription = algorithm.series_description("Measurements")
    sr.SoftwareVersions = __version__
    use_standard_meanings(sr)
    return sr


def node_device_uid(storage: Path) -> str:
    """The Device Observer UID of the node whose storage folder is ``storage``.

    Made once, the first time the node writes an SR (``2.25.`` and a random UUID), and kept in
    ``<storage>/device-observer-uid``: every SR of the node names the same device, whichever host, container
    or worker sharing that folder writes it, and restarts keep it; nodes with their own storage never name the
    same one. Host names play no part (a container's changes with each container).

    Raises
    ------
    ValueError
        If the file holds no DICOM UID (it was edited or damaged), or cannot be read or written (a full disk
        raises its own OSError, so the job waits for space as for any other write).
    """
    path = storage / DEVICE_UID_FILE
    try:
        if not path.exists():
            _store_once(path, generate_uid(prefix=None))
        text = path.read_bytes().decode("ascii", errors="replace").strip()
    except OSError as exc:
        if is_disk_full(exc):
            raise
        raise ValueError(
            f"this node's Device Observer UID cannot be kept in {path} ({exc.strerror or exc}): the node must be "
            "able to read and write its storage folder"
        ) from None
    if len(text) > 64 or not RE_VALID_UID.match(text):
        raise ValueError(
            f"{path} does not hold a DICOM UID (it reads {text[:80]!r}): it names this node as the device in every "
            "SR; put back the file from a backup, or delete it for the node to make a new one (its SRs then name "
            "a new device)"
        )
    return text


def _store_once(path: Path, uid: str) -> None:
    """Write ``uid`` to ``path`` unless it exists: whole, by a hard link, so processes starting at once (each
    with a UID of its own) all read the one that was linked first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as file:
            file.write(f"{uid}\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process of this node made it first: its UID stands
        else:
            fsync_folder(path.parent)
    finally:
        os.unlink(temporary)


def holds_3d_coordinates(item: Dataset) -> bool:
    """Whether a content item, or any item under it, is a SCOORD3D (3D spatial coordinates)."""
    return any(
        child.get("ValueType") == "SCOORD3D" or holds_3d_coordinates(child) for child in item.get("ContentSequence", [])
    )


def use_standard_meanings(dataset: Dataset) -> None:
    """Rewrite code meanings in the content tree to the templates' spelling (:data:`STANDARD_MEANINGS`)."""
    for item in dataset.get("ContentSequence", []):
        for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            for code in item.get(keyword, []):
                meaning = STANDARD_MEANINGS.get((str(code.CodeValue), str(code.CodingSchemeDesignator)))
                if meaning:
                    code.CodeMeaning = meaning
        use_standard_meanings(item)


def note_item(notes: Sequence[str]) -> hd.sr.TextContentItem:
    """A TEXT content item (121106, DCM, "Comment") holding the result's caveats, numbered."""
    text = "Read with care: " + " ".join(f"({n}) {note}" for n, note in enumerate(notes, start=1))
    return hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=text[:65534], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def not_found_item(structures: Sequence[str]) -> hd.sr.TextContentItem:
    """A TEXT content item (121106, DCM, "Comment") naming the structures the model found no voxel of."""
    text = (
        f"Not found in this series ({len(structures)} of the model's structures: outside the scanned range, or "
        f"absent): {', '.join(structures)}"
    )
    return hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=text[:65534], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def finding_site(name: str) -> hd.sr.FindingSite:
    """Where a structure's measurements were taken: the structure itself (with its side); for a finding such as
    a kidney cyst, whose type is no place, the anatomic region it lies in (the kidney, with its side), as the SEG
    says it."""
    coded = structure_codes(name)
    if coded.anatomic_region is not None:
        return hd.sr.FindingSite(anatomic_location=coded.anatomic_region, laterality=coded.anatomic_region_modifier)
    return hd.sr.FindingSite(anatomic_location=coded.type, laterality=coded.type_modifier)


def stated_volume(ml: float) -> float:
    """A volume as the SR states it: to a thousandth of a millilitre, or to six significant digits where that is
    finer, so that a structure of a few thin-slice voxels, present in the SEG, never reads 0 ml."""
    if ml <= 0:
        return 0.0
    return round(ml, max(3, 5 - math.floor(math.log10(ml))))


def _structure_group(
    seg: Dataset, item: Dataset, number: int, measured: StructureMeasurement, algorithm: Algorithm
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    coded = structure_codes(measured.name)
    site = finding_site(measured.name)
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name[:64],
        version=algorithm.version[:64],
        parameters=[f"{key}={value}" for key, value in algorithm.parameters] or None,
    )
    mean = partial(hd.sr.Measurement, name=ATTENUATION_COEFFICIENT, unit=HOUNSFIELD_UNIT, algorithm_id=algorithm_id)
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=item.TrackingUID, identifier=measured.name[:64]),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(seg.ReferencedSeriesSequence[0].SeriesInstanceUID),
        ),
        finding_type=coded.type,
        finding_sites=[site],
        measurements=[
            hd.sr.Measurement(
                name=codes.SCT.Volume,
                value=stated_volume(measured.volume_ml),
                unit=MILLILITRE,
                algorithm_id=algorithm_id,
            ),
            # No attenuation where none of the structure lies inside the reconstructed field: not a 0 HU.
            *(
                [
                    mean(value=round(measured.mean_hu, 2), derivation=codes.SCT.Mean),
                    mean(value=round(measured.sd_hu or 0.0, 2), derivation=codes.SCT.StandardDeviation),
                ]
                if measured.mean_hu is not None
                else []
            ),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=SCAN_COVERAGE, value=CUT_BY_SCAN_EDGE if measured.cut_by_scan_edge else WITHIN_SCAN
            )
        ],
    )
