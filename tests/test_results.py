"""What a radiologist sees of a job's results in a PACS: series told apart by number and description."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from copy import deepcopy
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.encode.measurements import measure
from dicom_node.encode.results import encode_results
from dicom_node.encode.sr import node_device_uid
from dicom_node.phantom import PhantomSpec, write_phantom_series
from inference.models.threshold import ThresholdModel
from inference.volume import load_series_volume
from tests.conftest import dciodvfy

SPEC = PhantomSpec(rows=64, columns=64, slices=12)
SOURCE_KINDS = {"single-frame": False, "enhanced-ct": True}
"""Single-frame CT images, or one Enhanced CT image (its slice measures in the shared functional group)."""


def _encode(
    folder: Path,
    run: int = 1,
    *,
    kinds: tuple[str, ...] = ("BINARY", "LABELMAP"),
    spec: PhantomSpec = SPEC,
    change: Callable[[pydicom.Dataset], None] | None = None,
    warnings: list[str] | None = None,
    relabel: Callable[[np.ndarray], None] | None = None,
    device_uid: str | None = None,
    patient_name: str | None = None,
) -> list[pydicom.Dataset]:
    """A phantom series (each source header altered by ``change``), segmented by the baseline (its label map
    altered by ``relabel``) and encoded in ``folder``/results: the headers of the result files."""
    series = write_phantom_series(folder / "ct", spec)
    for path in series.files if change is not None else []:
        dataset = pydicom.dcmread(path)
        change(dataset)
        dataset.save_as(path)
    volume = load_series_volume(series.files)
    model = ThresholdModel()
    segmentation = model.segment(volume)
    if relabel is not None:
        relabel(segmentation.labels)
    results = folder / f"run-{run}"
    results.mkdir()
    files = encode_results(
        volume,
        segmentation,
        measure(volume, segmentation.labels, segmentation.classes),
        model,
        results,
        list(kinds),
        run,
        rtstruct=True,
        warnings=warnings,
        device_uid=device_uid,
        patient_name=patient_name,
    )
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in files]


def test_each_result_object_and_each_run_has_its_own_series_number_and_description(tmp_path):
    first, second = _encode(tmp_path / "a", 1), _encode(tmp_path / "b", 2)

    numbers = {(d.Modality, d.SOPClassUID, int(d.SeriesNumber)) for d in first + second}
    assert len({n for *_, n in numbers}) == 10  # 5 objects x 2 runs, no number shared
    assert sorted(int(d.SeriesNumber) for d in first) == [9701, 9702, 9703, 9704, 9705]
    assert sorted(int(d.SeriesNumber) for d in second) == [9801, 9802, 9803, 9804, 9805]
    descriptions = [d.SeriesDescription for d in first]
    assert len(set(descriptions)) == 5 and all(len(text) <= 64 for text in descriptions)
    assert any(text.startswith("Label map ") for text in descriptions)
    assert all(d.SeriesDescription.endswith("(re-run 2)") for d in second)
    assert all(len(d.SeriesDate) == 8 and d.SeriesTime for d in first + second)


def test_a_source_without_type_2_patient_and_study_attributes_gets_them_empty_in_every_result(tmp_path):
    """An anonymised series may lack PatientSex, PatientBirthDate, StudyID ...: the job must not fail on it."""
    absent = ("PatientSex", "PatientBirthDate", "StudyID", "AccessionNumber", "StudyDate", "StudyTime", "PatientName")

    def remove(dataset: pydicom.Dataset) -> None:
        for keyword in absent:
            delattr(dataset, keyword)

    results = _encode(tmp_path, kinds=("BINARY",), change=remove)

    assert {d.Modality for d in results} == {"SEG", "SR", "RTSTRUCT"}
    for result in results:
        for keyword in absent:
            assert keyword in result and not result[keyword].value, (result.Modality, keyword)


@pytest.mark.parametrize(
    ("odd_slices", "even_slices", "study_name", "carried"),
    [
        ("MÜLLER^JÜRGEN", unicodedata.normalize("NFD", "Müller^Jürgen"), "Müller^Jürgen", "Müller^Jürgen"),
        ("MÜLLER^JÜRGEN", "MÜLLER^JÜRGEN", "Müller^Jürgen", "MÜLLER^JÜRGEN"),
        ("DOE^JOHN", "Doe^John", "Roe^Richard", None),
    ],
    ids=["two-spellings-carry-the-studys", "one-spelling-kept", "never-another-persons"],
)
def test_results_of_a_series_spelling_the_name_two_ways_carry_the_name_its_study_records(
    tmp_path, odd_slices, even_slices, study_name, carried
):
    """A series completed by a PACS re-sending it with the name in its own form holds two spellings of one
    person's name: its results name the patient as the study's row does (the first spelling stored, as queries
    answer it), not as whichever slice is first by position. A series of one spelling keeps its own."""

    def spell(dataset: pydicom.Dataset) -> None:
        dataset.SpecificCharacterSet = "ISO_IR 192"
        dataset.PatientName = odd_slices if int(dataset.InstanceNumber) % 2 else even_slices

    results = _encode(tmp_path, kinds=("BINARY",), change=spell, patient_name=study_name)

    assert {d.Modality for d in results} == {"SEG", "SR", "RTSTRUCT"}
    names = {str(d.PatientName) for d in results}
    assert len(names) == 1
    assert names <= ({carried} if carried else {odd_slices, even_slices})


def test_the_rtstruct_carries_the_same_patient_identity_as_the_seg(tmp_path):
    def identify(dataset: pydicom.Dataset) -> None:
        dataset.IssuerOfPatientID = "HOSPITAL_A"
        qualifier = pydicom.Dataset()
        qualifier.UniversalEntityID = "1.2.3.4.5"
        qualifier.UniversalEntityIDType = "ISO"
        dataset.IssuerOfPatientIDQualifiersSequence = [qualifier]
        other = pydicom.Dataset()
        other.PatientID = "OLD-123"
        other.TypeOfPatientID = "TEXT"
        dataset.OtherPatientIDsSequence = [other]
        dataset.PatientAge = "054Y"

    by_modality = {d.Modality: d for d in _encode(tmp_path, kinds=("BINARY",), change=identify)}
    seg, rtstruct = by_modality["SEG"], by_modality["RTSTRUCT"]
    for keyword in (
        "IssuerOfPatientID",
        "IssuerOfPatientIDQualifiersSequence",
        "OtherPatientIDsSequence",
        "PatientAge",
    ):
        assert keyword in rtstruct and rtstruct[keyword].value == seg[keyword].value, keyword


def test_the_results_of_two_series_of_one_study_are_told_apart_by_their_source_series(tmp_path):
    """An arterial and a venous series of one study: a PACS shows which segmentation belongs to which."""
    descriptions = {
        number: sorted(
            d.SeriesDescription
            for d in _encode(
                tmp_path / f"series{number}",
                kinds=("BINARY",),
                spec=replace(SPEC, series_number=number),
            )
        )
        for number in (2, 3)
    }
    assert all(f"of series {n}" in text for n, texts in descriptions.items() for text in texts), descriptions
    assert not set(descriptions[2]) & set(descriptions[3])
    assert all(len(text) <= 64 for texts in descriptions.values() for text in texts)


def _slice_measures(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """Where a source states its SliceThickness and SpacingBetweenSlices: the header of a single-frame image, the
    shared PixelMeasures of an Enhanced CT."""
    if "SharedFunctionalGroupsSequence" in dataset:
        return dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    return dataset


@pytest.mark.parametrize("enhanced", SOURCE_KINDS.values(), ids=SOURCE_KINDS.keys())
def test_the_seg_states_the_slice_step_of_the_volume_not_a_wrong_header_value(tmp_path, enhanced):
    """SpacingBetweenSlices 5 on slices 2.5 mm apart: the SEG carries 2.5, which its frames' positions show (an
    Enhanced CT's SEG said 5, and highdicom could not read it back as a volume); a missing SliceThickness, which
    the SEG must state, becomes that step, and the results say so."""

    def mislabel(dataset: pydicom.Dataset) -> None:
        measures = _slice_measures(dataset)
        measures.SpacingBetweenSlices = "5"
        del measures.SliceThickness

    warnings: list[str] = []
    step = replace(SPEC, slice_spacing=2.5, enhanced=enhanced)
    (seg,) = [
        d
        for d in _encode(tmp_path, kinds=("BINARY",), spec=step, change=mislabel, warnings=warnings)
        if d.Modality == "SEG"
    ]

    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert (float(measures.SpacingBetweenSlices), float(measures.SliceThickness)) == (2.5, 2.5)
    assert warnings == [
        "SliceThickness is missing from the source images: the segmentation states the slice step (2.5 mm) as its "
        "slice thickness"
    ]
    assert dciodvfy(Path(seg.filename))[0] == []
    volume = hd.seg.segread(seg.filename).get_volume(combine_segments=True)
    assert volume.spacing == pytest.approx((2.5, 0.8, 0.8))


@pytest.mark.parametrize("enhanced", SOURCE_KINDS.values(), ids=SOURCE_KINDS.keys())
@pytest.mark.parametrize(
    ("written", "said"),
    [
        ("abc", "'abc' in the source images, not a positive number"),
        ("NaN", "'NaN' in the source images, not a positive number"),
        ("3\\3", "'3\\3' in the source images, not a positive number"),
        ("0", "'0' in the source images, not a positive number"),
        ("-3", "'-3' in the source images, not a positive number"),
    ],
)
def test_a_slice_thickness_that_is_no_positive_number_becomes_the_step_with_a_warning(
    tmp_path, written, said, enhanced
):
    """'abc', NaN and '3\\3' failed the results with "could not convert string to float", "non-finite floats" or
    the generic stage sentence (a retry failed again); '0' and '-3' were copied into the SEG, which dciodvfy
    rejects."""

    def garble(dataset: pydicom.Dataset) -> None:
        _slice_measures(dataset)["SliceThickness"] = pydicom.dataelem.RawDataElement(
            pydicom.tag.Tag("SliceThickness"), "DS", len(written), written.encode(), 0, False, True
        )

    warnings: list[str] = []
    spec = replace(SPEC, slice_spacing=2.5, enhanced=enhanced)
    (seg,) = [
        d
        for d in _encode(tmp_path, kinds=("BINARY",), spec=spec, change=garble, warnings=warnings)
        if d.Modality == "SEG"
    ]

    assert float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == 2.5
    assert warnings == [
        f"SliceThickness is {said}: the segmentation states the slice step (2.5 mm) as its slice thickness"
    ]
    assert dciodvfy(Path(seg.filename))[0] == []


def test_a_slice_whose_orientation_differs_in_the_seventh_decimal_still_gets_its_results(tmp_path):
    """Admission takes orientations equal to three decimals as one; highdicom wants them exactly equal."""
    changed = iter(range(100))

    def jitter(dataset: pydicom.Dataset) -> None:
        if next(changed) == 2:
            dataset.ImageOrientationPatient = [0.9999999, 0.0001, 0, 0, 0.9999999, 0.0001]

    kinds = {d.Modality for d in _encode(tmp_path, kinds=("BINARY",), change=jitter)}
    assert kinds == {"SEG", "SR", "RTSTRUCT"}


def test_an_enhanced_ct_giving_orientation_and_pixel_spacing_per_frame_gets_its_results(tmp_path):
    """Some scanners write PlaneOrientation and PixelMeasures in every frame's group, not the shared one: the SEG
    states the values the volume was read with."""

    def per_frame(dataset: pydicom.Dataset) -> None:
        shared = dataset.SharedFunctionalGroupsSequence[0]
        for macro in ("PlaneOrientationSequence", "PixelMeasuresSequence"):
            for group in dataset.PerFrameFunctionalGroupsSequence:
                setattr(group, macro, deepcopy(shared[macro].value))
            delattr(shared, macro)
        dataset.PerFrameFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [0.8, 0.8]

    results = _encode(tmp_path, kinds=("BINARY",), spec=replace(SPEC, enhanced=True), change=per_frame)
    (seg,) = [d for d in results if d.Modality == "SEG"]
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.8, 0.8]
    assert {d.Modality for d in results} == {"SEG", "SR", "RTSTRUCT"}


def test_an_enhanced_ct_giving_pixel_spacing_per_frame_keeps_its_shared_slice_thickness(tmp_path):
    """PixelSpacing in every frame's PixelMeasures, SliceThickness in the shared one: the volume reads both, and so
    does the SEG (it stated no thickness, or the step with a warning that the source had none)."""

    def spacing_per_frame(dataset: pydicom.Dataset) -> None:
        shared = dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        for group in dataset.PerFrameFunctionalGroupsSequence:
            item = pydicom.Dataset()
            item.PixelSpacing = shared.PixelSpacing
            group.PixelMeasuresSequence = [item]
        del shared.PixelSpacing

    warnings: list[str] = []
    spec = replace(SPEC, enhanced=True, slice_spacing=2.5, slice_thickness=2.0)
    results = _encode(tmp_path, kinds=("BINARY",), spec=spec, change=spacing_per_frame, warnings=warnings)
    (seg,) = [d for d in results if d.Modality == "SEG"]

    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert (float(measures.SliceThickness), float(measures.SpacingBetweenSlices)) == (2.0, 2.5)
    assert [float(v) for v in measures.PixelSpacing] == [0.8, 0.8]
    assert not any("SliceThickness" in warning for warning in warnings)


def test_the_sr_names_the_structures_the_model_found_no_voxel_of(tmp_path):
    """'Not found' is said, so a reader tells it from 'not looked for'."""
    chest = PhantomSpec(rows=96, columns=96, slices=24, pixel_spacing=(4.0, 4.0), slice_spacing=5.0)  # lungs in it

    def without_skeleton(labels: np.ndarray) -> None:
        labels[labels == 4] = 1

    headers = _encode(tmp_path, kinds=("BINARY",), spec=chest, relabel=without_skeleton)
    sr = pydicom.dcmread(next(h.filename for h in headers if h.Modality == "SR"))

    comments = [
        str(item.TextValue)
        for item in sr.ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]
    assert comments == [
        "Not found in this series (1 of the model's structures: outside the scanned range, or absent): Skeleton"
    ]


def test_every_sr_of_this_node_names_the_same_device_observer(tmp_path):
    node = node_device_uid(tmp_path / "storage")
    first = _encode(tmp_path / "a", 1, device_uid=node)
    second = _encode(tmp_path / "b", 2, kinds=("BINARY",), device_uid=node)

    def device_uids(headers: list[pydicom.Dataset]) -> set[str]:
        uids = set()
        for header in headers:
            if header.Modality != "SR":
                continue
            for item in pydicom.dcmread(header.filename).ContentSequence:
                if item.ConceptNameCodeSequence[0].CodeValue == "121012":  # Device Observer UID
                    uids.add(str(item.UID))
        return uids

    assert device_uids(first) == device_uids(second) == {node}  # the BINARY and the LABELMAP SR, and the re-run
