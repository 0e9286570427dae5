"""Any Specific Character Set in the source: results carry the names in UTF-8 (ISO_IR 192) and never fail for it."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

from db.jobs import job_for_series_uid
from db.models import JobState
from dicom_node.encode.sources import RESULT_CHARACTER_SET, read_source_header
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import CT_RULES, dciodvfy, storescu

SMALL = PhantomSpec(rows=64, columns=64, slices=20, pixel_spacing=(6.0, 6.0), slice_spacing=8.0, noise_sd=5.0)
KANJI = "Yamada^Tarou=山田^太郎=やまだ^たろう"  # PS3.5 H.3.1
KATAKANA = "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"  # PS3.5 H.3.2
CASES = {
    "japanese-kanji": ("\\ISO 2022 IR 87", KANJI),
    "japanese-katakana-and-kanji": ("ISO 2022 IR 13\\ISO 2022 IR 87", KATAKANA),
    # kanji whose JIS X 0208 bytes include 0x3D, the byte of "=": 住 is 3D 3B, 修 3D 24
    "japanese-kanji-with-the-byte-of-equals": ("\\ISO 2022 IR 87", "Sumita^Shun=住田^俊=すみた^しゅん"),
    "japanese-kanji-ending-a-group-with-it": ("\\ISO 2022 IR 87", "Yamada^Osamu=山田^修=やまだ^おさむ"),
    "korean": ("\\ISO 2022 IR 149", "Hong^Gildong=洪^吉洞=홍^길동"),
    "chinese-gb18030": ("GB18030", "Wang^XiaoDong=王^小东"),
    "greek": ("ISO_IR 126", "Διονυσιος"),
    "undefined-value": ("ISO_IR 999", "Muller^Jurgen"),
}


@pytest.mark.parametrize("character_set, name", CASES.values(), ids=CASES.keys())
def test_source_text_is_decoded_and_redeclared_as_utf8(tmp_path, character_set, name):
    series = write_phantom_series(
        tmp_path, PhantomSpec(rows=8, columns=8, slices=1, character_set=character_set, patient_name=name)
    )

    header = read_source_header(series.files[0])
    written = tmp_path / "copy.dcm"
    header.save_as(written)

    assert header.SpecificCharacterSet == RESULT_CHARACTER_SET
    reread = pydicom.dcmread(written)
    assert reread.SpecificCharacterSet == RESULT_CHARACTER_SET
    assert str(reread.PatientName) == name


def test_undefined_character_set_is_read_as_latin1_with_a_warning_naming_the_instance(tmp_path, caplog):
    series = write_phantom_series(tmp_path, PhantomSpec(rows=8, columns=8, slices=1, character_set="ISO_IR 999"))
    path = series.files[0]
    ds = pydicom.dcmread(path)
    ds["PatientName"].value = "Müller^Jürgen".encode("latin-1")  # what a sender with a wrong label writes
    ds.save_as(path)

    with caplog.at_level(logging.WARNING):
        header = read_source_header(path)

    assert str(header.PatientName) == "Müller^Jürgen"
    [record] = [r for r in caplog.records if r.getMessage() == "source.character_set_undefined"]
    fields = record.event_fields
    assert fields["sop_instance_uid"] == series.sop_instance_uids[0]
    assert fields["detail"] == (
        "Specific Character Set 'ISO_IR 999' is not one DICOM defines: its text was read as Latin-1 (ISO_IR 100); "
        "the results are written in UTF-8 (ISO_IR 192)"
    )
    assert "Müller" not in str(fields)  # never the patient's name in the log


def test_descriptive_text_that_does_not_decode_is_replaced_with_a_warning(tmp_path, caplog):
    """Text the results only describe the images with (not who they belong to) keeps replacement characters."""
    series = write_phantom_series(tmp_path, PhantomSpec(rows=8, columns=8, slices=1, character_set="ISO_IR 192"))
    path = series.files[0]
    ds = pydicom.dcmread(path)
    ds.SeriesDescription = "Thorax"
    ds.save_as(path)
    path.write_bytes(path.read_bytes().replace(b"Thorax", b"Th\xf6rax"))  # a Latin-1 byte in a UTF-8 data set

    with caplog.at_level(logging.WARNING):
        header = read_source_header(path)

    assert str(header.SeriesDescription) == "Th\ufffdrax"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == ["source.text_not_decodable"]


@pytest.mark.integration
def test_a_patient_name_that_does_not_decode_fails_the_series_before_inference(tmp_path, start_node):
    """A name whose bytes are not valid in the declared character set would reach the results as replacement
    characters, another name than the one sent: the series is refused, naming the attribute, the instance and the
    character set (never the name), and nothing is processed or sent."""
    series = write_phantom_series(tmp_path / "ct", replace(SMALL, slices=4, character_set="ISO_IR 192"))
    for path in series.files:
        ds = pydicom.dcmread(path)
        ds.PatientName = "M?ller^J?rgen"
        ds.save_as(path)
        path.write_bytes(path.read_bytes().replace(b"M?ller^J?rgen", b"M\xfcller^J\xfcrgen"))  # Latin-1 bytes
    node = start_node(rules=CT_RULES)

    assert storescu(node.port, series.files).returncode == 0

    node.wait_for_state(series.series_instance_uid, JobState.FAILED, timeout=60)
    assert node.job_reason(series.series_instance_uid) == (
        "not admitted: PatientName of instance 1 does not decode in its SpecificCharacterSet 'ISO_IR 192', so the "
        "results would carry a changed name; the sender must correct it"
    )
    with node.sessions() as session:
        assert not job_for_series_uid(session, series.series_instance_uid).result_files


@pytest.mark.integration
@pytest.mark.parametrize(
    "character_set, name",
    [
        CASES["japanese-kanji"],
        CASES["japanese-katakana-and-kanji"],
        CASES["japanese-kanji-with-the-byte-of-equals"],
        CASES["undefined-value"],
    ],
    ids=["japanese-kanji", "japanese-katakana-and-kanji", "japanese-kanji-with-the-byte-of-equals", "undefined-value"],
)
def test_series_in_any_character_set_goes_done_with_utf8_results(tmp_path, start_node, character_set, name):
    series = write_phantom_series(tmp_path / "ct", replace(SMALL, character_set=character_set, patient_name=name))
    node = start_node(rules=CT_RULES, inference={"workers": 1}, results={"rtstruct": True})

    assert storescu(node.port, series.files).returncode == 0

    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=180)
    with node.sessions() as session:
        files = [Path(f) for f in job_for_series_uid(session, series.series_instance_uid).result_files]
    assert sorted(f.name for f in files) == ["rtstruct.dcm", "seg-binary.dcm", "sr-binary.dcm"]
    for path in files:
        result = pydicom.dcmread(path)
        assert result.SpecificCharacterSet == RESULT_CHARACTER_SET
        assert str(result.PatientName) == name
        errors, _warnings = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
    assert ("source.character_set_undefined" in node.log()) == (character_set == "ISO_IR 999")


@pytest.mark.parametrize(
    "character_set, read_as",
    [("ISO-IR 126", "ISO_IR 126"), ("ISO 2022-IR 87", "ISO 2022 IR 87"), ("ISO_IR 999", "Latin-1 (ISO_IR 100)")],
)
def test_undefined_value_warning_says_how_the_text_was_read(tmp_path, caplog, character_set, read_as):
    series = write_phantom_series(tmp_path, PhantomSpec(rows=8, columns=8, slices=1))
    ds = pydicom.dcmread(series.files[0])
    ds.SpecificCharacterSet = character_set
    ds.save_as(series.files[0])

    with caplog.at_level(logging.WARNING):
        read_source_header(series.files[0])

    [record] = [r for r in caplog.records if r.getMessage() == "source.character_set_undefined"]
    assert f"its text was read as {read_as};" in record.event_fields["detail"]


def patched(series_files: list[Path], *replacements: tuple[bytes, bytes]) -> None:
    """Replace bytes in each file as written (each found once), as a sender with a wrong label writes them."""
    for path in series_files:
        written = path.read_bytes()
        for old, new in replacements:
            assert written.count(old) == 1, old
            written = written.replace(old, new)
        path.write_bytes(written)


@pytest.mark.integration
def test_names_the_node_would_have_to_guess_the_character_set_of_are_refused_and_ascii_ones_accepted(
    tmp_path, start_node
):
    """Names beyond ASCII whose bytes only decode by guessing (pydicom reads no, the default or an undefined
    SpecificCharacterSet as Latin-1, which decodes any byte) reached the results as another name, labelled UTF-8:
    MÃ¼ller^JÃ¼rgen, È«^±æµ¿. The series is refused before inference, naming the attribute, the instance and the
    character set; a plain ASCII name reads the same under any label and is accepted."""
    utf_8 = "Müller^Jürgen"
    cases = {
        "misspelled-utf-8": (
            "ISO_IR 192",
            utf_8,
            [(b"ISO_IR 192", b"ISO_IR192 ")],
            "'ISO_IR192' (not a character set DICOM defines: plain ASCII only)",
        ),
        "utf-8-without-character-set": (
            "ISO_IR 192",
            utf_8,
            [(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 192", b"")],  # the whole element, in explicit VR little endian
            "(none given: plain ASCII only)",
        ),
        "korean-without-escape-sequence": (
            "\\ISO 2022 IR 149",
            "Hong^Gildong=XXXXXXX",  # as many ASCII bytes as the EUC-KR name below
            [(b"Hong^Gildong=XXXXXXX", b"Hong^Gildong=" + "홍^길동".encode("euc_kr"))],
            "'\\\\ISO 2022 IR 149' (plain ASCII except where an escape sequence switches character set)",
        ),
        "ascii-under-an-undefined-set": ("ISO_IR 192", "Muller^Jurgen", [(b"ISO_IR 192", b"ISO_IR192 ")], None),
    }
    sent = {}
    for number, (case, (character_set, name, replacements, _shown)) in enumerate(cases.items()):
        spec = replace(SMALL, slices=4, character_set=character_set, patient_name=name, patient_id=f"CHARSET-{number}")
        series = write_phantom_series(tmp_path / case, spec)
        patched(series.files, *replacements)
        sent[case] = series
    node = start_node(rules=CT_RULES)

    for case, series in sent.items():
        assert storescu(node.port, series.files).returncode == 0, case

    for case, (_set, _name, _replacements, shown_set) in cases.items():
        uid = sent[case].series_instance_uid
        if shown_set is None:
            node.wait_for_state(uid, JobState.QUEUED, timeout=60)
            continue
        node.wait_for_state(uid, JobState.FAILED, timeout=60)
        assert node.job_reason(uid) == (
            f"not admitted: PatientName of instance 1 does not decode in its SpecificCharacterSet {shown_set}, so "
            "the results would carry a changed name; the sender must correct it"
        ), case
