"""The node negotiates only transfer syntaxes it can decode; a sender of anything else falls back to uncompressed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from sqlalchemy import select

from db.models import Instance, JobState
from dicom_node.phantom import PhantomSpec, write_phantom_series
from dicom_node.receive.scp import ACCEPTED_TRANSFER_SYNTAXES, COMPRESSED_TRANSFER_SYNTAXES, NATIVE_TRANSFER_SYNTAXES
from tests.conftest import CT_RULES, require_tool, storescu, succeeded_files

SLICE = PhantomSpec(rows=64, columns=64, slices=1, pixel_spacing=(6.0, 6.0))
DCMCONV = {
    ExplicitVRLittleEndian: "+te",
    ImplicitVRLittleEndian: "+ti",
    DeflatedExplicitVRLittleEndian: "+td",
    ExplicitVRBigEndian: "+tb",
}
DCMCJPEG = {JPEGLosslessSV1: "+e1", JPEGLossless: "+el", JPEGBaseline8Bit: "+eb", JPEGExtended12Bit: "+ee"}
PYDICOM_ENCODER = {
    RLELossless: {},
    JPEG2000Lossless: {},
    JPEG2000: {"j2k_cr": [10]},
    JPEGLSLossless: {},
    JPEGLSNearLossless: {"jls_error": 3},
}
LOSSY_TOLERANCE = {JPEG2000: 200, JPEGLSNearLossless: 3, JPEGBaseline8Bit: 8, JPEGExtended12Bit: 20}
NO_ENCODER_HERE = {HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K}  # no installed HTJ2K encoder: decoder availability only
ONLY_JPEG_EXTENDED = """\
[[TransferSyntaxes]]
[JPEGExtendedOnly]
TransferSyntax1 = 1.2.840.10008.1.2.4.51

[[PresentationContexts]]
[CTInJPEGExtended]
PresentationContext1 = 1.2.840.10008.5.1.4.1.1.2\\JPEGExtendedOnly

[[Profiles]]
[JPEGExtended]
PresentationContexts = CTInJPEGExtended
"""


def _ct_slice(folder: Path, bits_stored: int = 16) -> tuple[Path, np.ndarray]:
    """A phantom CT slice; with ``bits_stored`` 12 or 8 as unsigned values of that depth (what JPEG Extended and Baseline hold)."""
    path = write_phantom_series(folder, SLICE).files[0]
    ds = pydicom.dcmread(path)
    if bits_stored < 16:
        stored = np.clip(ds.pixel_array.astype(np.int32), 0, 2**bits_stored - 1)
        if bits_stored == 8:
            stored = stored >> 4
        ds.BitsAllocated = 8 if bits_stored == 8 else 16
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
        ds.PixelData = stored.astype(np.uint8 if bits_stored == 8 else np.uint16).tobytes()
        path = folder / f"ct-{bits_stored}bit.dcm"
        ds.save_as(path)
    return path, pydicom.dcmread(path).pixel_array


def _encoded(syntax: UID, folder: Path) -> tuple[Path, np.ndarray]:
    """A CT slice encoded in ``syntax`` (DCMTK or pydicom's encoder), and the pixel values it was made from."""
    bits = {JPEGBaseline8Bit: 8, JPEGExtended12Bit: 12}.get(syntax, 16)
    source, pixels = _ct_slice(folder, bits)
    target = folder / "encoded.dcm"
    if syntax in DCMCONV:
        subprocess.run([require_tool("dcmconv"), DCMCONV[syntax], str(source), str(target)], check=True)
    elif syntax in DCMCJPEG:
        subprocess.run([require_tool("dcmcjpeg"), DCMCJPEG[syntax], str(source), str(target)], check=True)
    else:
        ds = pydicom.dcmread(source)
        ds.compress(syntax, **PYDICOM_ENCODER[syntax])
        ds.save_as(target)
    assert pydicom.dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    return target, pixels


def test_every_negotiated_transfer_syntax_decodes_a_ct_image(tmp_path):
    for index, syntax in enumerate(ACCEPTED_TRANSFER_SYNTAXES):
        if syntax in NO_ENCODER_HERE:
            assert get_decoder(syntax).is_available, syntax.name
            continue
        path, pixels = _encoded(syntax, tmp_path / str(index))
        decoded = pydicom.dcmread(path).pixel_array.astype(np.int32)
        difference = int(np.abs(decoded - pixels.astype(np.int32)).max())
        assert difference <= LOSSY_TOLERANCE.get(syntax, 0), f"{syntax.name}: off by up to {difference}"


def test_negotiated_list_holds_a_compressed_syntax_exactly_when_its_ct_image_decodes(tmp_path):
    assert ACCEPTED_TRANSFER_SYNTAXES[: len(NATIVE_TRANSFER_SYNTAXES)] == list(NATIVE_TRANSFER_SYNTAXES)
    for index, syntax in enumerate(COMPRESSED_TRANSFER_SYNTAXES):
        if syntax in NO_ENCODER_HERE:
            continue
        path, _pixels = _encoded(syntax, tmp_path / str(index))
        try:
            _ = pydicom.dcmread(path).pixel_array
            decodes = True
        except (RuntimeError, NotImplementedError, ValueError):
            decodes = False
        assert (syntax in ACCEPTED_TRANSFER_SYNTAXES) == decodes, syntax.name


@pytest.mark.integration
def test_sender_offering_only_jpeg_extended_has_its_context_rejected(tmp_path, start_node):
    if JPEGExtended12Bit in ACCEPTED_TRANSFER_SYNTAXES:
        pytest.fail("a 12-bit JPEG Extended decoder is installed here: this test needs a syntax the node cannot decode")
    path, _pixels = _encoded(JPEGExtended12Bit, tmp_path / "ct")
    config = tmp_path / "storescu.cfg"
    config.write_text(ONLY_JPEG_EXTENDED)
    node = start_node()

    sent = storescu(node.port, [path], extra=["-d", "-xf", str(config), "JPEGExtended"])

    output = sent.stdout + sent.stderr
    assert sent.returncode != 0 and succeeded_files(output) == []
    assert "Context ID:        1 (Transfer Syntaxes Not Supported)" in output, output
    assert "F: No Acceptable Presentation Contexts" in output, output
    with node.sessions() as session:
        assert session.scalars(select(Instance)).all() == []


@pytest.mark.integration
def test_jpeg_extended_series_from_a_pacs_arrives_uncompressed_by_its_fallback_and_goes_done(
    tmp_path, start_node, start_orthanc
):
    series = write_phantom_series(
        tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=20, pixel_spacing=(6.0, 6.0), slice_spacing=8.0)
    )
    files = []
    for path in series.files:  # 12-bit stored values, then JPEG Extended as a PACS archive might hold them
        ds = pydicom.dcmread(path)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.PixelData = np.clip(ds.pixel_array.astype(np.int32), 0, 4095).astype(np.uint16).tobytes()
        ds.save_as(path)
        target = path.with_suffix(".jpeg12.dcm")
        subprocess.run([require_tool("dcmcjpeg"), "+ee", str(path), str(target)], check=True)
        files.append(target)
    node = start_node(rules=CT_RULES, inference={"workers": 1})
    pacs = start_orthanc({"node": [node.ae_title, "127.0.0.1", node.port]})
    uploaded = [pacs.upload(path)["ID"] for path in files]

    pacs.post_json("/modalities/node/store", {"Resources": uploaded, "Synchronous": True})

    with node.sessions() as session:
        stored = [Path(p) for p in session.scalars(select(Instance.path))]
    assert len(stored) == len(files)
    assert {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in stored} <= set(
        NATIVE_TRANSFER_SYNTAXES
    )
    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=180)
