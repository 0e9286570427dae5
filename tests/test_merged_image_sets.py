"""Two image sets under one series (two reconstructions, two phases, two series merged by a PACS or router):
never one volume that changes reconstruction from slice to slice. The volume and admission decide alike."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian

from db.jobs import is_partial_warning
from dicom_node.admission import InstanceFile, admit
from dicom_node.config import AdmissionSettings
from dicom_node.phantom import PhantomSpec, write_phantom_series
from inference.volume import VolumeError, load_series_volume
from tests.conftest import real_ct_copy

STRICT = AdmissionSettings()
SPEC = PhantomSpec(rows=96, columns=80, slices=23, pixel_spacing=(4.0, 4.5), slice_spacing=3.0, noise_sd=0.0)
"""23 slices 3 mm apart: as two interleaved sets, 12 at 0, 6, 12 mm ... and 11 at 3, 9, 15 mm ..."""


def instance_files(paths: list[Path]) -> list[InstanceFile]:
    """The files as the database lists them for admission."""
    files = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        number = int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None
        syntax = str(ds.file_meta.TransferSyntaxUID)
        files.append(InstanceFile(path, str(ds.SOPInstanceUID), syntax, number))
    return files


def edit(paths: list[Path], change) -> None:
    """Rewrite each file with ``change(dataset, index)``."""
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        change(ds, index)
        ds.save_as(path)


def phantom(folder: Path, spec: PhantomSpec = SPEC) -> list[Path]:
    return list(write_phantom_series(folder, spec).files)


def refusals(paths: list[Path]) -> tuple[str | None, str]:
    """What admission and the volume say of the series: both must refuse it."""
    with pytest.raises(VolumeError) as refused:
        load_series_volume(paths)
    return admit(instance_files(paths), STRICT).refusal, str(refused.value)


def test_a_real_ct_split_into_two_interleaved_kernels_of_the_same_size_is_refused_naming_both(
    tmp_path, shared_fixtures
):
    """Br38f and Br64f every other slice (a soft-tissue and a bone reconstruction merged): 10 images each."""
    paths = real_ct_copy(tmp_path / "ct", shared_fixtures)
    edit(paths, lambda ds, index: setattr(ds, "ConvolutionKernel", ["Br64f", "3"]) if index % 2 else None)
    first_soft, first_bone = (pydicom.dcmread(path) for path in paths[:2])  # the first two by position

    admission, volume = refusals(paths)

    sets = (
        "the series holds 2 image sets (reconstructions, energies of a dual-energy scan, or series merged into one) that differ in "
        "ConvolutionKernel: 10 images with ConvolutionKernel Br38f\\3 (first: {soft}); 10 images with "
        "ConvolutionKernel Br64f\\3 (first: {bone}); the largest sets have 10 images each, so which one to "
        "process cannot be told: send each set as its own series"
    )
    assert volume == sets.format(
        soft=f"image {first_soft.InstanceNumber} (SOP Instance UID {first_soft.SOPInstanceUID})",
        bone=f"image {first_bone.InstanceNumber} (SOP Instance UID {first_bone.SOPInstanceUID})",
    )
    assert admission == sets.format(
        soft=f"instance {first_soft.InstanceNumber} (SOP Instance UID {first_soft.SOPInstanceUID})",
        bone=f"instance {first_bone.InstanceNumber} (SOP Instance UID {first_bone.SOPInstanceUID})",
    )


def test_a_real_ct_with_a_smaller_interleaved_kernel_keeps_the_larger_set_with_a_partial_warning(
    tmp_path, shared_fixtures
):
    paths = real_ct_copy(tmp_path / "ct", shared_fixtures)
    edit(paths, lambda ds, index: setattr(ds, "ConvolutionKernel", ["Br64f", "3"]) if index % 2 else None)
    paths.pop().unlink()  # one bone image less: 10 soft-tissue images, 9 bone images
    soft = [str(pydicom.dcmread(path).SOPInstanceUID) for path in paths[::2]]

    result = admit(instance_files(paths), STRICT)
    volume = load_series_volume(paths)

    assert result.admitted and result.images == 10
    assert sorted(s.sop_instance_uid for s in volume.slices) == sorted(soft)
    assert volume.spacing[2] == pytest.approx(4.0) and volume.excluded_images == 9
    [note] = volume.notes
    assert note.startswith(
        "partial series: the series holds 2 image sets (reconstructions, energies of a dual-energy scan, or series merged into one) that differ "
        "in ConvolutionKernel: 10 images with ConvolutionKernel Br38f\\3 (first: image "
    )
    assert "; 9 images with ConvolutionKernel Br64f\\3 (first: image " in note
    assert note.endswith("; processed the largest, 10 of 19 images")
    assert is_partial_warning(note)  # the results say they cover part of the series
    with pytest.raises(VolumeError, match="processed the largest, 10 of 19 images; a partial series is not processed"):
        load_series_volume(paths, allow_partial=False)


def test_the_real_ct_as_sent_is_admitted_and_read_whole(shared_fixtures):
    """Overlapping slices (2 mm apart, 3 mm thick), AcquisitionTime changing every slice, no SeriesNumber."""
    paths = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))

    result = admit(instance_files(paths), STRICT)
    volume = load_series_volume(paths, allow_partial=False)

    assert result.admitted and result.images == 20
    assert volume.hu.shape[0] == 20 and volume.notes == [] and volume.excluded_images == 0


@pytest.mark.parametrize(
    ("keyword", "other", "shown"),
    [
        (
            "ConvolutionKernel",
            "BONEPLUS",
            "ConvolutionKernel STANDARD (first: {}); 11 images with ConvolutionKernel BONEPLUS",
        ),
        ("SliceThickness", "1.25", "SliceThickness 3 mm (first: {}); 11 images with SliceThickness 1.25 mm"),
        (
            "ReconstructionDiameter",
            "250",
            "ReconstructionDiameter 360 mm (first: {}); 11 images with ReconstructionDiameter 250 mm",
        ),
        ("SeriesNumber", "602", "SeriesNumber 1 (first: {}); 11 images with SeriesNumber 602"),
        (
            "ImageType",
            ["DERIVED", "SECONDARY", "AXIAL"],
            "ImageType ORIGINAL\\PRIMARY\\AXIAL (first: {}); 11 images with ImageType DERIVED\\SECONDARY\\AXIAL",
        ),
    ],
)
def test_each_attribute_that_tells_two_sets_apart_keeps_the_larger_set_and_refuses_two_of_one_size(
    tmp_path, keyword, other, shown
):
    """Two sets at half-step positions under one SeriesInstanceUID and one AcquisitionNumber: together a regular
    3 mm stack, which every other check admitted and the models segmented as one CT."""
    paths = phantom(tmp_path / "uneven")
    edit(paths, lambda ds, index: setattr(ds, keyword, other) if index % 2 else None)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)

    result = admit(instance_files(paths), STRICT)
    volume = load_series_volume(paths)

    assert result.admitted and result.images == 12
    assert [s.sop_instance_uid for s in volume.slices] == [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths[::2]]
    assert volume.spacing[2] == pytest.approx(6.0)
    assert f"that differ in {keyword}: 12 images with " in volume.notes[0]
    assert shown.format(f"image 1 (SOP Instance UID {first.SOPInstanceUID})") in volume.notes[0]

    even = phantom(tmp_path / "even", replace(SPEC, slices=24))
    edit(even, lambda ds, index: setattr(ds, keyword, other) if index % 2 else None)
    admission, refusal = refusals(even)
    for reason in (admission, refusal):
        assert reason is not None and f"that differ in {keyword}: 12 images with " in reason
        assert reason.endswith(
            "the largest sets have 12 images each, so which one to process cannot be told: send each set as its "
            "own series"
        )


def test_a_larger_set_that_is_no_regular_stack_on_its_own_is_refused_naming_the_attribute(tmp_path):
    """Every third slice reconstructed with another kernel: the rest are 3 and 6 mm apart by turns."""
    paths = phantom(tmp_path)
    edit(paths, lambda ds, index: setattr(ds, "ConvolutionKernel", "BONE") if index % 3 == 2 else None)

    admission, volume = refusals(paths)

    for reason in (admission, volume):
        assert reason is not None
        assert "that differ in ConvolutionKernel: 16 images with ConvolutionKernel STANDARD (first: " in reason
        assert (
            "; the largest set does not make one regular stack on its own (about 1 missing slice(s): slices 2 and 3 "
            in reason
        )
        assert reason.endswith("): send each set as its own series")


def test_a_set_whose_images_lack_the_attribute_that_differs_cannot_be_told_apart(tmp_path):
    paths = phantom(tmp_path)
    edit(paths, lambda ds, index: setattr(ds, "ConvolutionKernel", "BONE") if index % 2 else None)
    edit(paths[1:2], lambda ds, index: delattr(ds, "ConvolutionKernel"))

    admission, volume = refusals(paths)

    for reason in (admission, volume):
        assert reason is not None
        assert "image(s) give no ConvolutionKernel (first: " in reason
        assert reason.endswith("so which set they belong to cannot be told: send each set as its own series")


def test_two_sets_that_only_their_instance_numbers_tell_apart_are_refused(tmp_path):
    """A router merged two series alike in every attribute compared: each numbered from 1."""
    paths = phantom(tmp_path)
    edit(paths, lambda ds, index: setattr(ds, "InstanceNumber", index // 2 + 1))
    first, second = (pydicom.dcmread(path, stop_before_pixels=True) for path in paths[:2])

    admission, volume = refusals(paths)

    expected = (
        "InstanceNumber 1 is used by 2 images at different positions ({} at {:g} mm and {} at {:g} mm along the "
        "slices, and 10 more InstanceNumber(s) alike): two image sets merged into one series (by a PACS, a router, "
        "or two reconstructions) that no other attribute tells apart; send each set as its own series"
    )
    depths = float(first.ImagePositionPatient[2]), float(second.ImagePositionPatient[2])
    names = [f"image 1 (SOP Instance UID {ds.SOPInstanceUID})" for ds in (first, second)]
    assert volume == expected.format(names[0], depths[0], names[1], depths[1])
    assert admission == volume.replace("image 1 (", "instance 1 (")


def test_numbers_begun_afresh_in_each_block_of_one_acquisition_are_one_set(tmp_path):
    """A step-and-shoot scan numbering each block from 1 under one AcquisitionNumber: the repeated numbers lie
    block after block, never among each other, so the series is one stack, read whole."""
    paths = phantom(tmp_path, replace(SPEC, slices=24))
    edit(paths, lambda ds, index: setattr(ds, "InstanceNumber", index % 8 + 1))

    result = admit(instance_files(paths), STRICT)
    volume = load_series_volume(paths, allow_partial=False)

    assert result.admitted and result.images == 24
    assert volume.hu.shape[0] == 24 and volume.notes == []


def test_a_legitimate_helical_series_is_not_taken_for_two_sets(tmp_path):
    """Overlapping 3 mm slices every 1.5 mm, AcquisitionTime and ContentTime of each slice, ReconstructionDiameter
    missing on some, SliceThickness and the diameter written to other precisions, one InstanceNumber everywhere."""
    paths = phantom(tmp_path, replace(SPEC, slice_spacing=1.5, slice_thickness=3.0))

    def helical(ds, index):
        ds.AcquisitionTime = ds.ContentTime = f"1203{index:02d}.{index * 37:06d}"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI"] if index % 2 else ["ORIGINAL", "PRIMARY"]
        ds.SliceThickness = "3.000" if index % 2 else "3"
        if index % 3 == 0:
            del ds.ReconstructionDiameter
        else:
            ds.ReconstructionDiameter = "360.00" if index % 2 else "360"
        ds.InstanceNumber = 1

    edit(paths, helical)

    result = admit(instance_files(paths), STRICT)
    volume = load_series_volume(paths, allow_partial=False)

    assert result.admitted and result.images == 23
    assert volume.hu.shape[0] == 23 and volume.notes == [] and volume.spacing[2] == pytest.approx(1.5)


def test_step_and_shoot_blocks_of_two_kernels_are_refused_by_admission_as_by_the_volume(tmp_path):
    """Four acquisitions one after another make one stack; two of them reconstructed with another kernel."""
    paths = phantom(tmp_path, replace(SPEC, slices=24))

    def blocks(ds, index):
        ds.AcquisitionNumber = 1 + index // 6
        if index >= 12:
            ds.ConvolutionKernel = "LUNG"

    edit(paths, blocks)

    admission, volume = refusals(paths)

    assert admission is not None and admission == volume.replace("(first: image ", "(first: instance ")
    assert "differ in ConvolutionKernel: 12 images with ConvolutionKernel LUNG" in volume
    assert volume.endswith(
        "the largest sets have 12 images each, so which one to process cannot be told: send each set as its own series"
    )


def test_frames_of_an_enhanced_ct_are_told_apart_by_their_own_reconstruction(tmp_path):
    """Per-frame CT Reconstruction items before the shared one: frames alternate between two kernels."""
    [path] = phantom(tmp_path, replace(SPEC, slices=12, enhanced=True))
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0].CTReconstructionSequence[0]
    for number, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        own = pydicom.Dataset()
        own.ConvolutionKernel = "BONE" if number % 2 else "STANDARD"
        own.ReconstructionDiameter = shared.ReconstructionDiameter
        group.CTReconstructionSequence = [own]
    ds.save_as(path)

    admission, volume = refusals([path])

    uid = ds.SOPInstanceUID
    assert admission is not None and admission.startswith(
        "the series holds 2 image sets (reconstructions, energies of a dual-energy scan, or series merged into one) that differ in ConvolutionKernel: "
        f"6 images with ConvolutionKernel BONE (first: frame 2 of instance 1 (SOP Instance UID {uid})); 6 images "
        f"with ConvolutionKernel STANDARD (first: frame 1 of instance 1 (SOP Instance UID {uid})); the largest sets"
    )
    assert f"ConvolutionKernel BONE (first: frame 2 of image (SOP Instance UID {uid}))" in volume


def two_scans_interleaved(paths: list[Path], second_scan, seconds_apart: int = 40) -> None:
    """Every other slice from a second scan of the region ``seconds_apart`` later (a second contrast phase), numbered
    on: one AcquisitionNumber, one kernel and thickness, unique InstanceNumbers; ``second_scan(ds)`` marks it."""

    def scans(ds, index):
        later = index % 2
        ds.AcquisitionTime = f"1030{(index // 2) % 60:02d}.250000" if not later else f"10{30 + seconds_apart // 60}"
        if later:
            ds.AcquisitionTime += f"{seconds_apart % 60 + index // 2:02d}.250000"
            second_scan(ds)
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = index // 2 + 1 + later * 100

    edit(paths, scans)


def test_two_scans_told_apart_only_by_their_acquisition_times_are_refused_naming_both(tmp_path):
    """Two contrast phases under one series, each slice at its own position: together a regular stack of twice the
    slices, which reached DONE with mean HU between the two phases'."""
    paths = phantom(tmp_path, replace(SPEC, slices=24))
    two_scans_interleaved(paths, lambda ds: None)
    first_late = pydicom.dcmread(paths[1], stop_before_pixels=True)

    admission, volume = refusals(paths)

    for reason, image in ((admission, "instance"), (volume, "image")):
        assert reason is not None
        assert reason.startswith(
            "the series holds 2 image sets (scans of one region at different times, such as two contrast phases, or "
            "series merged into one) that differ in AcquisitionTime: 12 images with AcquisitionTime 10:30:00 to "
            "10:30:11 (first: "
        )
        assert (
            f"12 images with AcquisitionTime 10:30:40 to 10:30:51 (first: {image} 101 (SOP Instance UID "
            f"{first_late.SOPInstanceUID}))"
        ) in reason
        assert reason.endswith("so which one to process cannot be told: send each set as its own series")


def test_a_smaller_second_scan_is_left_out_with_a_partial_warning(tmp_path):
    """A second phase over the upper part only, at the half-steps of the first: the complete scan is processed, the
    warning names both."""
    paths = phantom(tmp_path, replace(SPEC, slices=48))
    two_scans_interleaved(paths, lambda ds: None)
    for path in paths[13::2]:  # the second scan covers the first 6 half-steps
        path.unlink()
    sent, kept = paths[:12] + paths[12::2], paths[::2]

    result = admit(instance_files(sent), STRICT)
    volume = load_series_volume(sent)

    assert result.admitted and result.images == 24
    assert [s.sop_instance_uid for s in volume.slices] == [str(pydicom.dcmread(p).SOPInstanceUID) for p in kept]
    assert volume.notes[0].startswith(
        "partial series: the series holds 2 image sets (scans of one region at different times, such as two contrast "
        "phases, or series merged into one) that differ in AcquisitionTime: 24 images with AcquisitionTime 10:30:00 "
        "to 10:30:23 (first: "
    )
    assert "; 6 images with AcquisitionTime 10:30:40 to 10:30:45 (first: image 101 " in volume.notes[0]
    assert volume.notes[0].endswith("processed the largest, 24 of 30 images")
    assert is_partial_warning(volume.notes[0])


@pytest.mark.parametrize(
    ("keyword", "first", "second", "shown"),
    [
        ("TemporalPositionIdentifier", 1, 2, "TemporalPositionIdentifier 1"),
        ("KVP", "80", "140", "KVP 140 kV"),
        (
            "ImageType",
            ["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI DUAL", "DET_A"],
            ["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI DUAL", "DET_B"],
            "ImageType ORIGINAL\\PRIMARY\\AXIAL\\CT_SOM5 SPI DUAL\\DET_A",
        ),
    ],
)
def test_phases_and_energies_acquired_at_once_are_told_apart_by_their_own_attributes(
    tmp_path, keyword, first, second, shown
):
    """Two phases numbered by TemporalPositionIdentifier, a dual-energy scan's two tubes (KVP, or ImageType's later
    values): at one AcquisitionTime, interleaved, one set each."""
    paths = phantom(tmp_path, replace(SPEC, slices=24))
    edit(paths, lambda ds, index: setattr(ds, keyword, second if index % 2 else first))
    edit(paths, lambda ds, index: setattr(ds, "InstanceNumber", index // 2 + 1 + (index % 2) * 100))

    admission, volume = refusals(paths)

    for reason in (admission, volume):
        assert reason is not None and f"that differ in {keyword}: 12 images with {shown} (first: " in reason
        assert reason.endswith("so which one to process cannot be told: send each set as its own series")


def test_frames_of_an_enhanced_ct_acquired_in_two_scans_are_told_apart_by_their_frame_times(tmp_path):
    """One Enhanced CT instance whose frames alternate between two phases 4 minutes apart (FrameAcquisitionDateTime)."""
    [path] = phantom(tmp_path, replace(SPEC, slices=12, enhanced=True))
    ds = pydicom.dcmread(path)
    for number, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        when = f"20261205103{0 + 4 * (number % 2)}{number // 2:02d}.000000"
        group.FrameContentSequence[0].FrameAcquisitionDateTime = when
    ds.save_as(path)

    admission, volume = refusals([path])

    for reason in (admission, volume):
        assert reason is not None
        assert (
            "that differ in AcquisitionTime: 6 images with AcquisitionTime 10:30:00 to 10:30:05 (first: frame 1 of"
            in (reason)
        )
        assert "; 6 images with AcquisitionTime 10:34:00 to 10:34:05 (first: frame 2 of " in reason


@pytest.mark.parametrize(
    ("case", "times"),
    [
        (
            "a helix crossing midnight, no AcquisitionDate",
            [f"2359{50 + i:02d}" if i < 10 else f"0000{i - 10:02d}" for i in range(23)],
        ),
        ("step-and-shoot blocks 20 s apart", [f"1030{(i // 6) * 20 + i % 6:02d}" for i in range(23)]),
        ("blocks resumed after a 3-minute tube-cooling wait", [f"103{0 if i < 12 else 3}{i:02d}" for i in range(23)]),
        ("one slice with an odd time", [f"1030{i:02d}" if i != 11 else "104500" for i in range(23)]),
        ("every slice at one time", ["103000"] * 23),
        ("times in the old form with colons", [f"10:30:{i:02d}.5" for i in range(23)]),
    ],
)
def test_acquisition_times_of_one_scan_are_not_taken_for_two(tmp_path, case, times):
    paths = phantom(tmp_path)
    edit(paths, lambda ds, index: setattr(ds, "AcquisitionTime", times[index]))

    result = admit(instance_files(paths), STRICT)
    volume = load_series_volume(paths, allow_partial=False)

    assert result.admitted and result.images == 23, case
    assert volume.hu.shape[0] == 23 and volume.notes == [], case


def test_bolus_tracking_images_outnumbering_the_scan_are_left_out_not_chosen(tmp_path):
    """30 monitoring images at one table position (AcquisitionNumber 2) beside the 23-slice scan (AcquisitionNumber
    1): the larger group makes no volume, so the scan is processed, with a warning naming both."""
    paths = phantom(tmp_path / "scan")
    edit(paths, lambda ds, index: setattr(ds, "AcquisitionNumber", 1))
    monitoring = phantom(tmp_path / "monitoring", replace(SPEC, slices=30))
    series_uid = pydicom.dcmread(paths[0], stop_before_pixels=True)
    middle = pydicom.dcmread(paths[11], stop_before_pixels=True).ImagePositionPatient

    def tracking(ds, index):
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "AccessionNumber"):
            setattr(ds, keyword, series_uid.get(keyword))
        ds.ImagePositionPatient, ds.AcquisitionNumber, ds.InstanceNumber = middle, 2, 100 + index

    edit(monitoring, tracking)

    result = admit(instance_files(paths + monitoring), STRICT)
    volume = load_series_volume(paths + monitoring)

    assert result.admitted  # the volume picks among the acquisitions
    assert [s.sop_instance_uid for s in volume.slices] == [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths]
    assert volume.notes[0].startswith(
        "partial series: 2 acquisitions or matrix sizes in one series; processed the largest stack of slices, 23 of "
        "53 images (AcquisitionNumber 1, 96 x 80 at 4 x 4.5 mm); 30 images of AcquisitionNumber 2, 96 x 80 at 4 x "
        "4.5 mm lie at 1 position(s) only (bolus-tracking or dynamic images): no volume"
    )


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit VR", "implicit VR"])
def test_frames_of_an_enhanced_ct_in_two_temporal_positions_are_named_by_their_index(tmp_path, implicit):
    """TemporalPositionIndex (a binary number, UL) of each frame's Frame Content: read as 1 and 2, not as bytes,
    also where the file gives no VR (implicit VR, read by the data dictionary's)."""
    [path] = phantom(tmp_path, replace(SPEC, slices=12, enhanced=True))
    ds = pydicom.dcmread(path)
    for number, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        group.FrameContentSequence[0].TemporalPositionIndex = 1 + number % 2
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)

    admission, volume = refusals([path])

    for reason in (admission, volume):
        assert reason is not None
        assert (
            "that differ in TemporalPositionIdentifier: 6 images with TemporalPositionIdentifier 1 (first: frame 1"
            in (reason)
        )
        assert "; 6 images with TemporalPositionIdentifier 2 (first: frame 2 " in reason


def test_two_kernels_at_the_same_positions_are_not_taken_for_bolus_tracking_images(tmp_path):
    """AcquisitionNumber 1 as B30f and B70f at the same 23 positions, AcquisitionNumber 2 a 12-slice repeat: the
    46 images repeat every position, but at 23 positions they are two image sets, not monitoring images; the
    12-slice repeat must not be processed instead of them."""
    soft = phantom(tmp_path / "soft")
    bone = phantom(tmp_path / "bone")
    repeat = phantom(tmp_path / "repeat", replace(SPEC, slices=12))
    first = pydicom.dcmread(soft[0], stop_before_pixels=True)

    def same_series(kernel: str, acquisition: int, offset: int):
        def change(ds, index):
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "AccessionNumber"):
                setattr(ds, keyword, first.get(keyword))
            ds.ConvolutionKernel, ds.AcquisitionNumber, ds.InstanceNumber = kernel, acquisition, offset + index

        return change

    edit(soft, same_series("B30f", 1, 1))
    edit(bone, same_series("B70f", 1, 101))
    edit(repeat, same_series("B30f", 2, 201))

    with pytest.raises(VolumeError) as refused:
        load_series_volume(soft + bone + repeat)

    assert "lie at" not in str(refused.value) and "bolus" not in str(refused.value)
