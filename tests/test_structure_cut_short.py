"""A data set cut short is refused at C-STORE, and an image without its pixels (or a CT image without Rows and
Columns) too, whatever the transfer syntax.

pydicom reads a short last value without a word, and a cut-off SeriesInstanceUID is still a valid UID: the slice was
acknowledged into a one-image series of its own while its real series was processed one slice short, as if whole.
A refusal names the series only where the walk passed the whole SeriesInstanceUID value.
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from sqlalchemy import select

from db.models import Instance, RejectedInstance
from dicom_node import status
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.receive.header import InvalidInstance, check_header, read_header
from dicom_node.receive.storage import encode_file_meta
from dicom_node.receive.structure import structure_refusal
from tests.conftest import Node, data_set_bytes, send_file_raw

SERIES_TAG = 0x0020000E
PIXEL_DATA_TAG = 0x7FE00010
UNDEFINED = 0xFFFFFFFF
SEND_AGAIN = "the image was refused, ask the sender to send it again"


def _encoded(dataset: Dataset, *, implicit: bool = False) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def _offset(dataset: Dataset, tag: int) -> int:
    """Where top-level element ``tag`` starts in ``_encoded(dataset)`` (elements are written in tag order)."""
    return len(_encoded(dataset[:tag]))


def _value_start(dataset: Dataset, tag: int) -> int:
    """Where the value of a top-level element of a short-length VR (UI, DS, ...) starts (explicit VR)."""
    return _offset(dataset, tag) + 8


def _refused(encoded: bytes, syntax: str) -> InvalidInstance:
    with pytest.raises(InvalidInstance) as refused:
        read_header(encoded, UID(syntax))
    assert refused.value.status == status.CANNOT_UNDERSTAND
    return refused.value


def _accepted(encoded: bytes, syntax: str, dataset: Dataset) -> None:
    header = check_header(read_header(encoded, UID(syntax)), str(dataset.SOPClassUID), str(dataset.SOPInstanceUID))
    assert header.series.series_instance_uid == dataset.SeriesInstanceUID


@pytest.fixture(scope="module")
def real_slice(shared_fixtures) -> Dataset:
    """A real CT slice of the shared example, JPEG 2000 compressed (encapsulated pixel data)."""
    path = sorted((shared_fixtures / "example_ct_dicom_valid").glob("*.dcm"))[0]
    dataset = pydicom.dcmread(path)
    assert dataset.file_meta.TransferSyntaxUID == JPEG2000Lossless
    return dataset


@pytest.fixture(scope="module")
def phantom_slice(tmp_path_factory) -> Dataset:
    """A native (Explicit VR Little Endian) CT slice of the node's phantom."""
    folder = tmp_path_factory.mktemp("phantom")
    spec = PhantomSpec(rows=32, columns=32, slices=2, noise_sd=0.0, pixel_spacing=(2.0, 2.0), slice_spacing=2.0)
    return pydicom.dcmread(write_phantom_series(folder, spec).files[0])


# -- cut short ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["real JPEG 2000", "phantom native"])
def test_a_data_set_cut_inside_its_series_uid_is_refused_naming_no_series(kind, real_slice, phantom_slice):
    dataset, syntax = (real_slice, JPEG2000Lossless) if kind == "real JPEG 2000" else (phantom_slice, None)
    syntax = syntax or ExplicitVRLittleEndian
    encoded = _encoded(dataset)
    value = len(dataset["SeriesInstanceUID"].value) + len(dataset["SeriesInstanceUID"].value) % 2
    cut = encoded[: _value_start(dataset, SERIES_TAG) + value // 2]

    refusal = _refused(cut, syntax)

    assert str(refusal) == (
        f"the data set is cut short: element (0020,000E) SeriesInstanceUID declares {value} bytes and "
        f"{value // 2} remain; {SEND_AGAIN}"
    )
    assert refusal.series_instance_uid is None  # the cut-off UID names a series that does not exist


def test_a_cut_before_the_series_uid_names_no_series(real_slice):
    encoded = _encoded(real_slice)
    study_value = _value_start(real_slice, 0x0020000D)

    refusal = _refused(encoded[: study_value + 5], JPEG2000Lossless)

    assert "element (0020,000D) StudyInstanceUID declares" in str(refusal)
    assert refusal.series_instance_uid is None


@pytest.mark.parametrize("tag", [0x00200032, 0x00280030], ids=["ImagePositionPatient", "PixelSpacing"])
def test_a_cut_inside_a_later_element_is_refused_naming_the_series(tag, real_slice):
    encoded = _encoded(real_slice)

    refusal = _refused(encoded[: _value_start(real_slice, tag) + 3], JPEG2000Lossless)

    assert str(refusal).startswith(f"the data set is cut short: element ({tag >> 16:04X},{tag & 0xFFFF:04X})")
    assert refusal.series_instance_uid == real_slice.SeriesInstanceUID


def test_a_data_set_ending_inside_an_element_header_is_refused(real_slice):
    encoded = _encoded(real_slice)
    after_series = _offset(real_slice, SERIES_TAG + 1)

    refusal = _refused(encoded[: after_series + 3], JPEG2000Lossless)

    assert str(refusal) == f"the data set is cut short: it ends 3 byte(s) into the header of an element; {SEND_AGAIN}"
    assert refusal.series_instance_uid == real_slice.SeriesInstanceUID


def test_a_cut_inside_encapsulated_pixel_data_is_refused_naming_the_series(real_slice):
    encoded = _encoded(real_slice)
    pixel_value = _offset(real_slice, PIXEL_DATA_TAG) + 12
    offset_table = struct.unpack_from("<L", encoded, pixel_value + 4)[0]
    fragment = pixel_value + 8 + offset_table
    fragment_length = struct.unpack_from("<L", encoded, fragment + 4)[0]

    refusal = _refused(encoded[: fragment + 8 + fragment_length // 2], JPEG2000Lossless)

    assert str(refusal) == (
        f"the data set is cut short: a compressed fragment of Pixel Data declares {fragment_length:,} bytes and "
        f"{fragment_length // 2:,} remain; {SEND_AGAIN}"
    )
    assert refusal.series_instance_uid == real_slice.SeriesInstanceUID


def test_encapsulated_pixel_data_never_closed_is_refused(real_slice):
    encoded = _encoded(real_slice)
    assert encoded[-8:] == struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)

    refusal = _refused(encoded[:-8], JPEG2000Lossless)

    assert str(refusal) == (
        "the data set is cut short: Pixel Data (7FE0,0010), encapsulated, of undefined length is never closed (its "
        f"delimiter is missing); {SEND_AGAIN}"
    )
    assert refusal.series_instance_uid == real_slice.SeriesInstanceUID


def test_a_cut_inside_native_pixel_data_is_refused_naming_the_series(phantom_slice):
    encoded = _encoded(phantom_slice)

    refusal = _refused(encoded[: len(encoded) - 100], ExplicitVRLittleEndian)

    assert str(refusal).startswith("Pixel Data is truncated: 1948 of 2048 bytes (Rows 32 x Columns 32")
    assert refusal.series_instance_uid == phantom_slice.SeriesInstanceUID


def _open_sequence() -> bytes:
    """A private sequence of undefined length whose item is never closed, nor the sequence."""
    return (
        struct.pack("<HH2sH", 0x0029, 0x0010, b"LO", 4)
        + b"OPEN"
        + struct.pack("<HH2sHL", 0x0029, 0x1010, b"SQ", 0, UNDEFINED)
        + struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED)
        + struct.pack("<HH2sH", 0x0029, 0x1011, b"LO", 2)
        + b"x "
    )


def test_an_undefined_length_sequence_left_open_at_the_end_is_refused(real_slice):
    encoded = _encoded(real_slice)
    after_series = _encoded(real_slice[:0x00290000])
    open_at_end = after_series + _open_sequence()  # the data set ends inside its item

    refusal = _refused(open_at_end, JPEG2000Lossless)

    assert str(refusal) == (
        "the data set is cut short: element (0029,1010) (private) of undefined length is never closed (its "
        f"delimiter is missing); {SEND_AGAIN}"
    )
    assert refusal.series_instance_uid == real_slice.SeriesInstanceUID
    # opened before the series UID, it swallows it: pydicom would read the series inside the sequence item
    prefix = len(_encoded(real_slice[:0x00200000]))
    before_series = encoded[:prefix] + _open_sequence() + encoded[prefix:]
    assert _refused(before_series, JPEG2000Lossless).series_instance_uid is None
    assert structure_refusal(before_series, implicit=False, little_endian=True) is not None


def test_a_cut_in_implicit_vr_is_refused(phantom_slice):
    encoded = _encoded(phantom_slice, implicit=True)
    value_start = len(_encoded(phantom_slice[:SERIES_TAG], implicit=True)) + 8

    refusal = _refused(encoded[: value_start + 7], ImplicitVRLittleEndian)

    assert "element (0020,000E) SeriesInstanceUID declares" in str(refusal)
    assert refusal.series_instance_uid is None


# -- images without their pixels --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["real JPEG 2000", "phantom native"])
def test_a_ct_image_without_pixel_data_is_refused(kind, real_slice, phantom_slice):
    dataset, syntax = (real_slice, JPEG2000Lossless) if kind == "real JPEG 2000" else (phantom_slice, None)
    syntax = syntax or ExplicitVRLittleEndian
    without = _encoded(dataset[:PIXEL_DATA_TAG])

    refusal = _refused(without, syntax)

    assert str(refusal).startswith("image has no Pixel Data (its header declares Rows ")
    assert refusal.series_instance_uid == dataset.SeriesInstanceUID


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, ExplicitVRLittleEndian])
def test_a_ct_image_without_rows_and_columns_is_refused(syntax, real_slice, phantom_slice):
    dataset = real_slice if syntax == JPEG2000Lossless else phantom_slice
    without = copy.deepcopy(dataset)
    del without.Rows, without.Columns

    refusal = _refused(_encoded(without), syntax)

    assert str(refusal).startswith("CT image has no Rows and Columns")
    assert refusal.series_instance_uid == dataset.SeriesInstanceUID


@pytest.mark.parametrize(
    ("sop_class", "syntax"),
    [
        (BasicTextSRStorage, ExplicitVRLittleEndian),
        (BasicTextSRStorage, JPEG2000Lossless),  # a report sent under an image's transfer syntax: still no image
        (GrayscaleSoftcopyPresentationStateStorage, JPEG2000Lossless),
    ],
)
def test_an_object_that_is_no_image_needs_no_pixel_data(sop_class, syntax):
    dataset = Dataset()
    dataset.SOPClassUID, dataset.SOPInstanceUID = sop_class, generate_uid()
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.Modality = "SR" if sop_class == BasicTextSRStorage else "PR"

    _accepted(_encoded(dataset), syntax, dataset)


# -- whole images still accepted ---------------------------------------------------------------------------------


def test_whole_images_of_every_kind_are_accepted(real_slice, tmp_path):
    _accepted(_encoded(real_slice), JPEG2000Lossless, real_slice)
    kinds = {
        None: ExplicitVRLittleEndian,
        "implicit": ImplicitVRLittleEndian,
        "deflate": DeflatedExplicitVRLittleEndian,
        "jpeg2000": JPEG2000Lossless,
        "rle": "1.2.840.10008.1.2.5",
    }
    for compression, syntax in kinds.items():
        spec = PhantomSpec(rows=32, columns=32, slices=1, noise_sd=5.0, compression=compression)
        path = write_phantom_series(tmp_path / str(compression), spec).files[0]
        dataset = pydicom.dcmread(path)
        assert dataset.file_meta.TransferSyntaxUID == syntax
        _accepted(data_set_bytes(path), syntax, dataset)
    for legacy in (False, True):  # Enhanced CT, Legacy Converted Enhanced CT
        spec = PhantomSpec(rows=32, columns=32, slices=3, noise_sd=5.0, enhanced=True, legacy_converted=legacy)
        path = write_phantom_series(tmp_path / f"enhanced-{legacy}", spec).files[0]
        dataset = pydicom.dcmread(path)
        _accepted(data_set_bytes(path), str(dataset.file_meta.TransferSyntaxUID), dataset)


# -- end to end ----------------------------------------------------------------------------------------------------


def _store(node: Node, folder: Path, dataset: Dataset, encoded: bytes) -> int:
    """C-STORE ``encoded`` as it is (not re-encoded by pynetdicom): a file of its meta and these bytes, sent raw."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    path.write_bytes(
        encode_file_meta(str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), ExplicitVRLittleEndian, "PACS")
        + encoded
    )
    response = send_file_raw(node.port, path, CTImageStorage, ExplicitVRLittleEndian, called_ae=node.ae_title)
    return int(response.Status)


@pytest.mark.integration
def test_a_slice_cut_inside_its_series_uid_is_refused_and_nothing_is_stored_for_it(tmp_path, start_node):
    node = start_node()
    spec = PhantomSpec(rows=32, columns=32, slices=3, noise_sd=0.0, pixel_spacing=(2.0, 2.0), slice_spacing=2.0)
    slices = [pydicom.dcmread(path) for path in write_phantom_series(tmp_path / "series", spec).files]
    victim = slices[0]
    encoded = _encoded(victim)
    cut = encoded[: _value_start(victim, SERIES_TAG) + 19]  # "1.2.826.0.1.3680043": a valid UID, cut off

    assert _store(node, tmp_path / "send", victim, cut) == status.CANNOT_UNDERSTAND
    assert [_store(node, tmp_path / "send", other, _encoded(other)) for other in slices[1:]] == [0, 0]

    with node.sessions() as session:
        refused = session.execute(
            select(RejectedInstance.series_instance_uid, RejectedInstance.reason).where(
                RejectedInstance.sop_instance_uid == victim.SOPInstanceUID
            )
        ).one()
        stored = session.scalars(select(Instance.sop_instance_uid)).all()
    assert refused.series_instance_uid is None
    assert refused.reason.startswith("the data set is cut short: element (0020,000E) SeriesInstanceUID declares")
    assert sorted(stored) == sorted(str(other.SOPInstanceUID) for other in slices[1:])
    instances = node.storage / "instances"
    assert not [path for path in instances.rglob("*") if victim.SOPInstanceUID in path.name]
    assert {path.parent.name for path in instances.rglob("*.dcm")} == {victim.SeriesInstanceUID}


def test_a_wrong_length_that_throws_the_walk_out_of_step_is_refused_as_damaged(real_slice):
    """SeriesDescription declaring 2 bytes more than it holds: what follows no longer reads as elements, and the
    walk runs past the end on a value of no real element; refused as damaged, naming no series."""
    encoded = bytearray(_encoded(real_slice))
    length_at = _offset(real_slice, 0x0008103E) + 6
    struct.pack_into("<H", encoded, length_at, struct.unpack_from("<H", encoded, length_at)[0] + 2)

    refusal = _refused(bytes(encoded), JPEG2000Lossless)

    assert str(refusal).startswith("the data set is damaged: its elements do not follow one another")
    assert refusal.series_instance_uid is None


@pytest.mark.parametrize("junk", [b"Patient report: nothing to see here.\n" * 20, bytes(300)])
def test_junk_that_runs_past_its_end_is_still_named_not_a_data_set(junk):
    assert str(_refused(junk, ExplicitVRLittleEndian)).startswith("not a DICOM data set:")
