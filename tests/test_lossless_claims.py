"""An image whose transfer syntax allows lossless data only, but whose frame is lossy, is not used.

A DCT-coded JPEG frame labelled JPEG Lossless, a near-lossless JPEG-LS scan labelled JPEG-LS Lossless, or an
irreversible (9-7) JPEG 2000 codestream labelled JPEG 2000 Lossless Only all decode without a warning: the
results would then say their source was never lossy compressed (the SEG's LossyImageCompression "00", no
caveat in the SR). The frames here are made by DCMTK (dcmcjpeg, dcmcjpls) and OpenJPEG from the real CT, and
relabelled as a misconfigured archive would send them.
"""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless

from inference.volume import load_series_volume
from tests.conftest import real_ct_copy, require_tool
from tests.test_pixel_integrity import _name, _refusal

VICTIM = 5  # the slice (by position) sent relabelled


def _native(path: Path, folder: Path) -> Path:
    dataset = pydicom.dcmread(path)
    dataset.decompress(generate_instance_uid=False)
    native = folder / "native.tmp"
    dataset.save_as(native)
    return native


def _dcmtk(tool: str, option: str) -> Callable[[Path], None]:
    def encode(path: Path) -> None:
        native = _native(path, path.parent.parent)
        subprocess.run([require_tool(tool), option, str(native), str(path)], check=True)
        native.unlink()

    return encode


def _openjpeg_lossy(path: Path) -> None:
    dataset = pydicom.dcmread(path)
    dataset.decompress(generate_instance_uid=False)
    dataset.compress(JPEG2000, j2k_cr=[20], generate_instance_uid=False)
    dataset.save_as(path)


def _relabelled(files: list[Path], encode: Callable[[Path], None], label: UID) -> pydicom.Dataset:
    """Encode the victim slice lossy and label it ``label``, with its original header (DCMTK marks a lossy copy
    DERIVED, with a new UID and LossyImageCompression "01"); it still decodes without a warning."""
    victim = files[VICTIM]
    original = pydicom.dcmread(victim, stop_before_pixels=True)
    encode(victim)
    dataset = pydicom.dcmread(victim)
    dataset.file_meta.TransferSyntaxUID = label
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = original.SOPInstanceUID
    dataset.ImageType = original.ImageType
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        dataset.pop(keyword, None)
    dataset.save_as(victim)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pydicom.dcmread(victim).pixel_array.shape == (512, 512)
    assert not caught
    return dataset


CASES = {
    "jpeg-baseline-as-lossless": (
        _dcmtk("dcmcjpeg", "+eb"),
        JPEGLosslessSV1,
        "is lossy JPEG (DCT-based, frame marker SOF0), but its transfer syntax, JPEG Lossless (first-order "
        "prediction), allows lossless data only",
    ),
    "jpeg-ls-near-lossless-as-lossless": (
        _dcmtk("dcmcjpls", "+en"),
        JPEGLSLossless,
        "is near-lossless JPEG-LS (NEAR 2), but its transfer syntax, JPEG-LS Lossless, allows lossless data only",
    ),
    "jpeg2000-irreversible-as-lossless": (
        _openjpeg_lossy,
        JPEG2000Lossless,
        "uses the irreversible (9-7) wavelet transform, which is lossy, but its transfer syntax, JPEG 2000 "
        "(lossless only), allows lossless data only",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_lossy_frame_under_a_lossless_transfer_syntax_is_refused_naming_the_image(shared_fixtures, tmp_path, case):
    encode, label, how = CASES[case]
    files = real_ct_copy(tmp_path / "ct", shared_fixtures)
    relabelled = _relabelled(files, encode, label)

    assert _refusal(files) == (
        f"the pixel data of {_name(relabelled)} {how}; it is not used: send the image again from the scanner or archive"
    )


@pytest.mark.parametrize(
    "encode", [_dcmtk("dcmcjpeg", "+e1"), _dcmtk("dcmcjpls", "+el")], ids=["jpeg-lossless", "jpeg-ls-lossless"]
)
def test_truly_lossless_frames_and_the_scanners_reversible_jpeg2000_load_unchanged(shared_fixtures, tmp_path, encode):
    files = real_ct_copy(tmp_path / "ct", shared_fixtures)
    reference = load_series_volume(files).hu  # the scanner's own JPEG 2000 Lossless Only (reversible) files
    encode(files[VICTIM])

    np.testing.assert_array_equal(load_series_volume(files).hu, reference)
