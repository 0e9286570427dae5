"""C-FIND matching on the database: the node answers queries from its records, never by scanning files.

Supported matching (PS3.4 C.2.2.2): universal (empty or ``*``), single value,
wildcard (``*`` and ``?``), range on dates and times (``A-B``, ``-B``, ``A-``)
and UID lists (``uid1\\uid2``). Times are compared as times of day, a value of partial precision covering its whole
unit (:func:`_time_condition`). Every key asked is answered, private ones too (:class:`_AnswerShape`); a Study Root
request has no PATIENT level (:func:`check_level_in_model`).
Person names (PatientName, ReferringPhysicianName) match without their
empty trailing components, trailing spaces and empty trailing component groups, in the query and in what is
stored (PS3.5 6.2.1): ``DOE^JOHN`` is ``DOE^JOHN^^``; a name of fewer component groups matches a stored name's
first groups (``YAMADA^TAROU`` finds ``YAMADA^TAROU=山田^太郎``). Only instances still held are visible: a series
purged by retention has no instance rows and so no match; a result series is visible only while its job is
neither FAILED nor IGNORED (:func:`_served_series`). An instance is visible only
under its own patient: one whose PatientID, issuer (IssuerOfPatientID, or the UniversalEntityID of
IssuerOfPatientIDQualifiersSequence), PatientName, PatientBirthDate or PatientSex differs from its
study's is never answered or sent. A patient is a PatientID from one issuer, in either form; where its studies
name different people (another name, birth date or sex), each person is answered on their own, and a
PATIENT-level retrieval of them all is refused. A value no matching could use is refused in a sentence naming its
attribute (:func:`check_searchable`): longer than its VR allows, with more than :data:`MAX_WILDCARDS` wildcards,
a list of too many UIDs, or a control character (a NUL would end SQLite's pattern early); trailing padding (spaces,
NULs) is no part of a value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from typing import Any, Literal

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from sqlalchemy import Boolean, ColumnElement, Integer, Select, and_, distinct, false, func, literal, or_, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from db.models import Instance, Job, JobState, Series, Study
from db.names import GROUPS
from dicom_node.encode.values import MAXIMUM_LENGTHS, person_name_problem
from dicom_node.logs import shown
from dicom_node.receive.header import StudyPatient, comparable_identity

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
LEVELS: tuple[Level, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")
Kind = Literal["text", "name", "uid", "date", "time", "number"]


class QueryError(ValueError):
    """The identifier cannot be answered (unknown level, retrieval without a unique key, ...)."""


class UnsearchableValue(QueryError):
    """A key's value the node does not search for (:func:`check_searchable`): longer than any value of the attribute
    can be, with more wildcards or listed values than matching takes, or holding a control character. Its sentence
    names the attribute and what is wrong, never the value."""

    def __init__(self, keyword: str, problem: str) -> None:
        super().__init__(f"{keyword} {problem}: the node does not search for such a value")
        self.keyword = keyword


class AmbiguousPatient(QueryError):
    """A PATIENT-level retrieval whose PatientID belongs to patients of several issuers, and that names none; or
    whose studies, under one PatientID, name different people."""


@dataclass(frozen=True)
class Key:
    level: Level
    column: InstrumentedAttribute[Any]
    kind: Kind


KEYS: dict[str, Key] = {
    "PatientID": Key("PATIENT", Study.patient_id, "text"),
    "IssuerOfPatientID": Key("PATIENT", Study.issuer_of_patient_id, "text"),
    "PatientName": Key("PATIENT", Study.patient_name, "name"),
    "PatientBirthDate": Key("PATIENT", Study.patient_birth_date, "date"),
    "PatientSex": Key("PATIENT", Study.patient_sex, "text"),
    "StudyInstanceUID": Key("STUDY", Study.study_instance_uid, "uid"),
    "StudyDate": Key("STUDY", Study.study_date, "date"),
    "StudyTime": Key("STUDY", Study.study_time, "time"),
    "AccessionNumber": Key("STUDY", Study.accession_number, "text"),
    "StudyID": Key("STUDY", Study.study_id, "text"),
    "StudyDescription": Key("STUDY", Study.study_description, "text"),
    "ReferringPhysicianName": Key("STUDY", Study.referring_physician_name, "name"),
    "SeriesInstanceUID": Key("SERIES", Series.series_instance_uid, "uid"),
    "Modality": Key("SERIES", Series.modality, "text"),
    "SeriesNumber": Key("SERIES", Series.series_number, "number"),
    "SeriesDescription": Key("SERIES", Series.series_description, "text"),
    "BodyPartExamined": Key("SERIES", Series.body_part_examined, "text"),
    "Manufacturer": Key("SERIES", Series.manufacturer, "text"),
    "SOPInstanceUID": Key("IMAGE", Instance.sop_instance_uid, "uid"),
    "SOPClassUID": Key("IMAGE", Instance.sop_class_uid, "uid"),
    "InstanceNumber": Key("IMAGE", Instance.instance_number, "number"),
    "NumberOfFrames": Key("IMAGE", Instance.number_of_frames, "number"),
}
"""Matching keys and the columns behind them."""

UNIQUE_KEYS: dict[Level, str] = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
QUALIFIERS = "IssuerOfPatientIDQualifiersSequence"
"""The issuer of the PatientID as a universal identifier: matched and answered by its first item's UniversalEntityID
(with its UniversalEntityIDType), a PATIENT-level key as IssuerOfPatientID is."""
COUNTS = {
    "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances",
    "ModalitiesInStudy",
    "SOPClassesInStudy",
}


def query_level(identifier: Dataset) -> Level:
    """The identifier's Query/Retrieve Level.

    Raises
    ------
    QueryError
        If it is missing or not one of PATIENT, STUDY, SERIES, IMAGE.
    """
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise QueryError(f"QueryRetrieveLevel {shown(level or '(missing)')} is not one of {', '.join(LEVELS)}")
    return level


class LevelNotInModel(UnsearchableValue):
    """A Query/Retrieve Level the request's information model does not have (PATIENT in a Study Root model): refused
    as a value the node does not search for, which a peer may repeat at will."""

    def __init__(self, problem: str) -> None:
        QueryError.__init__(self, problem)
        self.keyword = "QueryRetrieveLevel"


STUDY_ROOT_MODELS = frozenset(
    {
        "1.2.840.10008.5.1.4.1.2.2.1",  # Study Root Query/Retrieve Information Model - FIND
        "1.2.840.10008.5.1.4.1.2.2.2",  # - MOVE
        "1.2.840.10008.5.1.4.1.2.2.3",  # - GET
    }
)
"""The Study Root models: their top level is STUDY (PS3.4 C.6.2), they have no PATIENT level."""


def check_level_in_model(identifier: Dataset, sop_class_uid: str) -> None:
    """Refuse a Query/Retrieve Level the request's information model (the SOP Class of its presentation context)
    does not have: PATIENT in a Study Root C-FIND, C-MOVE or C-GET.

    Raises
    ------
    QueryError
        As :func:`query_level` does; :class:`LevelNotInModel` saying the Study Root model has no PATIENT level.
    """
    if query_level(identifier) == "PATIENT" and str(sop_class_uid) in STUDY_ROOT_MODELS:
        raise LevelNotInModel("the Study Root model has no PATIENT level: query by STUDY, SERIES or IMAGE")


def conditions(identifier: Dataset, level: Level) -> list[ColumnElement[bool]]:
    """SQL conditions for every non-universal key at or above ``level``, plus ModalitiesInStudy; each value is
    checked first (:func:`check_searchable`).

    Raises
    ------
    QueryError
        A value that cannot be matched (:class:`UnsearchableValue`, a number that is none, a UID list of no UID).
    """
    depth = LEVELS.index(level)
    found: list[ColumnElement[bool]] = []
    declared = _value(identifier.get("SpecificCharacterSet", "")) not in ("", "ISO_IR 6")  # ISO_IR 6: ASCII
    for element in identifier:
        keyword = element.keyword
        if keyword == QUALIFIERS:
            universal_entity_id = _asked_universal_entity_id(element.value)
            if universal_entity_id and universal_entity_id != "*":
                _check_in_declared_set("UniversalEntityID", universal_entity_id, declared)
                check_searchable("UniversalEntityID", universal_entity_id)
                found.append(_matching(Study.issuer_universal_entity_id, universal_entity_id))
            continue
        value = _value(element.value)
        if keyword == "ModalitiesInStudy" and value:
            _check_in_declared_set(keyword, value, declared)
            check_searchable(keyword, value)
            wanted = _listed(value)
            if wanted and "*" not in wanted:  # "*" matches every study, as for any other key
                matches = or_(*(_matching(Series.modality, v) for v in wanted))
                found.append(_of_studies_served(matches))
            continue
        key = KEYS.get(keyword)
        if key is None or LEVELS.index(key.level) > depth or not value or value == "*":
            continue  # a key the node does not match on (a private one, say) is answered, never searched for
        _check_in_declared_set(keyword, value, declared)
        if key.kind == "name":
            # trimmed as any person name is ("PatientName" only picks the rule); "^^" or "=" alone: universal
            value = comparable_identity("PatientName", value)
            if not value or value == "*":
                continue
        check_searchable(keyword, value)
        if keyword == "AccessionNumber":
            found.append(_of_an_order(value) if depth == LEVELS.index("STUDY") else _series_of_an_order(value))
            continue
        found.append(_condition(key, value))
    return found


def _check_in_declared_set(keyword: str, value: str, declared: bool) -> None:
    """Refuse a value with characters beyond ASCII in a query that declares no SpecificCharacterSet: which letters
    its bytes are is a guess (Latin-1? UTF-8?), and a wrong guess finds nothing, as the receiver refuses such a
    name rather than guessing.

    Raises
    ------
    UnsearchableValue
        Naming the attribute and SpecificCharacterSet.
    """
    if not declared and not value.isascii():
        raise UnsearchableValue(
            keyword,
            "holds characters beyond ASCII, but the query declares no SpecificCharacterSet, so which letters they "
            "are is unknown: send the query with SpecificCharacterSet (ISO_IR 192 for UTF-8)",
        )


MAX_WILDCARDS = 32
"""The most wildcards (``*`` and ``?``) one value may hold: a planning system writes a few (``DOE*``,
``*^JOHN*``, ``??????``); dozens select nothing more, and each costs the database work on every row."""
MAX_LISTED_UIDS = 5000
"""The most UIDs one UID list (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, SOPClassUID) may hold: a
retrieval of a series' instances one by one lists a few thousand; every UID is one parameter of the database
query, and the databases take some tens of thousands in all."""
MAX_LISTED_MODALITIES = 64
"""The most values ModalitiesInStudy may hold (DICOM defines fewer modalities): each is one more alternative of
the database query, whose depth the database limits."""
RANGE_LENGTHS = {"DA": 18, "TM": 28, "DT": 54}
"""The longest date and time ranges (PS3.5 Table 6.2-1, in a query with range matching): two values and a
hyphen."""
UNSTORED_LENGTHS = {"UniversalEntityID": 64}
"""Keys whose VR sets no useful limit (UT), by the longest value the node records for them."""
CONTROL_CHARACTERS = frozenset([*map(chr, range(0x20)), "\x7f"])
"""C0 control characters and DEL: no value the node matches holds one. ESC starts the escape sequences of ISO 2022
character sets, which pydicom has already read where SpecificCharacterSet declares the set: an ESC left in a
decoded value switches to a set that is not declared (as the receiver decides, :func:`~dicom_node.receive.header.
decode_strictly`)."""


def check_searchable(keyword: str, value: str) -> None:
    """Refuse a key's value that no matching could use: longer than any value of the attribute can be (its VR's
    length; a person name 64 characters per component group, 3 groups; a date or time range two values and a
    hyphen), with more than :data:`MAX_WILDCARDS` wildcards, a UID list of more than :data:`MAX_LISTED_UIDS` UIDs
    (ModalitiesInStudy: :data:`MAX_LISTED_MODALITIES`), or holding a control character (NUL included, which
    SQLite's pattern matching would read as the pattern's end and PostgreSQL refuses). ``value`` is without its
    trailing padding (:func:`_value`).

    Raises
    ------
    UnsearchableValue
        Naming the attribute and what is wrong with its value (its length, its count), never the value.
    """
    vr = dictionary_VR(keyword)
    most = MAX_LISTED_UIDS if vr == "UI" else MAX_LISTED_MODALITIES if keyword == "ModalitiesInStudy" else None
    listed = value.split("\\") if most is not None else [value]  # a key of one value is matched whole
    if most is not None and len(listed) > most:
        raise UnsearchableValue(keyword, f"lists {len(listed)} values, more than the {most} the node matches")
    for part in listed:
        problem = _unsearchable(keyword, vr, part.strip())
        if problem is not None:
            raise UnsearchableValue(keyword, problem)


def _unsearchable(keyword: str, vr: str, value: str) -> str | None:
    """Why :func:`check_searchable` refuses one value, as the end of a sentence; None when it is searched for."""
    if "\x1b" in value:
        return "holds an escape sequence to a character set that its SpecificCharacterSet does not declare"
    if not CONTROL_CHARACTERS.isdisjoint(value):
        return "holds a control character (NUL, a tab, a line break or similar), which no ID, name or date holds"
    if vr == "PN":
        problem = person_name_problem(value)
        if problem is not None:
            return problem
    else:
        ranged = vr in RANGE_LENGTHS and "-" in value
        limit = RANGE_LENGTHS[vr] if ranged else UNSTORED_LENGTHS.get(keyword, MAXIMUM_LENGTHS.get(vr))
        measured = value.replace(".", "") if vr == "DA" else value  # the older YYYY.MM.DD form reads as YYYYMMDD
        if limit is not None and len(measured) > limit:
            allows = "the node records" if keyword in UNSTORED_LENGTHS else f"DICOM allows ({vr}{' range' * ranged})"
            return f"is {len(value)} characters long, more than the {limit} {allows}"
        if vr == "DA" and "*" not in value and "?" not in value and not _is_date_or_range(value):
            return (
                "is not a date (YYYYMMDD, a real day of the calendar) or a range of two (20261201-20261204, "
                "20261201-, -20261204)"
            )
    wildcards = value.count("*") + value.count("?")
    if wildcards > MAX_WILDCARDS:
        return f"holds {wildcards} wildcards (* and ?), more than the {MAX_WILDCARDS} the node matches in one value"
    return None


def _is_date_or_range(value: str) -> bool:
    """Whether ``value`` is a DA value or range of DA values the node can compare: each bound YYYYMMDD (or the
    older YYYY.MM.DD) and a day of the calendar, at least one bound in a range."""
    bounds = [bound.strip() for bound in value.replace(".", "").split("-")]
    if len(bounds) > 2 or not any(bounds):
        return False
    for bound in filter(None, bounds):
        if len(bound) != 8 or not bound.isdigit():
            return False
        try:
            datetime.strptime(bound, "%Y%m%d")
        except ValueError:
            return False
    return True


def _asked_universal_entity_id(items: Any) -> str:
    """The UniversalEntityID a query's IssuerOfPatientIDQualifiersSequence asks for ("" when none)."""
    if not isinstance(items, Sequence) or not items:
        return ""
    return _value(items[0].get("UniversalEntityID", ""))


def _of_an_order(accession_number: str) -> ColumnElement[bool]:
    """Studies of the order ``accession_number``: the study's AccessionNumber (its first series') or that of any of
    its series still served (a study may carry several orders, each series its own)."""
    of_a_series = _of_studies_served(_matching(Series.accession_number, accession_number))
    return or_(_matching(Study.accession_number, accession_number), of_a_series)


def _series_of_an_order(accession_number: str) -> ColumnElement[bool]:
    """Series (and their images) of the order ``accession_number``: each series' own AccessionNumber, its study's
    where it carries none. A query at SERIES or IMAGE level for one order of a study of two is answered that
    order's series, not every series of the study."""
    return _matching(series_accession_number(), accession_number)


def series_accession_number() -> ColumnElement[str | None]:
    """A series' AccessionNumber as answered: its own (the order it was acquired for), else its study's."""
    return func.coalesce(func.nullif(Series.accession_number, ""), Study.accession_number)


def _of_studies_served(series_condition: ColumnElement[bool]) -> ColumnElement[bool]:
    """Studies with a series that meets ``series_condition`` and whose instances are served (:func:`_joined`), as
    the study's answer counts them. The series are read in a common table expression: nested as a subquery, the
    name comparison of :func:`_of_the_study_patient` would be deeper than SQLite's parser takes."""
    studies = _joined([series_condition]).with_only_columns(Series.study_id).cte()
    return Study.id.in_(select(studies.c.study_id))


def _value(raw: Any) -> str:
    """A key's value as text, several values joined by backslashes, without its padding (spaces; NULs at its end,
    as DICOM pads a UID)."""
    if raw is None:
        return ""
    if isinstance(raw, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in raw).rstrip("\x00 ")
    return str(raw).strip().rstrip("\x00 ")


def _listed(value: str) -> list[str]:
    """The values of a key's text (backslash-separated), each stripped, the empty ones left out."""
    return [v.strip() for v in value.split("\\") if v.strip()]


def _condition(key: Key, value: str) -> ColumnElement[bool]:
    column = key.column
    if key.kind == "uid":
        uids = _listed(value)
        if not uids:
            raise QueryError(f"{_attribute(column.key)} holds no UID, only empty values ({_plain(value)})")
        return column.in_(uids) if len(uids) > 1 else column == uids[0]
    if key.kind == "time" and "*" not in value and "?" not in value:
        start, ranged, end = value.partition("-")
        return _time_condition(column, start.strip(), end.strip() if ranged else start.strip())
    if key.kind == "date":
        value = value.replace(".", "")  # the older YYYY.MM.DD form reads as YYYYMMDD, in a range or a single value
    if key.kind == "date" and "-" in value:
        # stored dates are YYYYMMDD (the receiver refuses longer ones), compared as text
        start, end = (bound.strip() for bound in value.partition("-")[::2])
        bounds = [column >= start] if start else []
        if end:
            bounds.append(column <= end)
        return and_(column.is_not(None), *bounds)
    if key.kind == "number":
        try:
            return column == int(value)
        except ValueError:
            raise QueryError(f"{_attribute(column.key)} is not a number ({_plain(value)})") from None
    if key.kind == "name":
        return _name_matching(column, value)
    return _matching(column, value)


TIME_DIGITS = 12
"""A time of day as compared: HHMMSS and six digits of fraction, without colons or point (:func:`_time_bound`)."""
TIME_FORM = re.compile(r"\d\d(?:\d\d(?:\d\d(?:\.\d{1,6})?)?)?")
"""A TM value (PS3.5 6.2): HH, HHMM, HHMMSS or HHMMSS.FFFFFF, once the colons of the older HH:MM:SS form are out."""
TIME_UNITS_MOST = (23, 59, 60)
"""The largest hour, minute and second of a TM value (60: a leap second)."""


def _time_condition(column: Any, start: str, end: str) -> ColumnElement[bool]:
    """A time ``column`` within ``start``-``end`` (either may be empty: open), compared as times of day, not as
    text: a stored ``10:15:00`` (the older form with colons, stored as sent) is ``101500``, and a value of partial
    precision covers its whole unit, in what is stored and in the query alike (``1015`` is 10:15:00 to
    10:15:59.999999). A stored time matches when its unit and the range overlap; a single value is the range from
    itself to itself, so ``101500`` finds ``10:15:00``, ``1015`` and ``101500.25``.

    Raises
    ------
    QueryError
        A bound that is not a time of day.
    """
    digits = func.replace(func.replace(column, ":", ""), ".", "")
    if start and end and _time_bound(column.key, start, "0") > _time_bound(column.key, end, "9"):
        return false()  # a range that ends before it starts holds no time
    bounds = []
    if start:
        stored_end = func.substr(digits.concat("9" * TIME_DIGITS), 1, TIME_DIGITS)
        bounds.append(stored_end >= _time_bound(column.key, start, "0"))
    if end:
        stored_start = func.substr(digits.concat("0" * TIME_DIGITS), 1, TIME_DIGITS)
        bounds.append(stored_start <= _time_bound(column.key, end, "9"))
    return and_(column.is_not(None), column != "", *bounds)


def _time_bound(name: str, value: str, padding: str) -> str:
    """A query's time as :data:`TIME_DIGITS` digits: the start of its unit (``padding`` ``0``) or its end (``9``:
    ``1015`` ends at ``101599999999``, after every time of that minute and before the next one). The comparison
    is of digits only, of one length, so that it orders alike in SQLite and in any PostgreSQL collation."""
    time = value.replace(":", "")
    if not TIME_FORM.fullmatch(time) or not _is_time_of_day(time):
        raise QueryError(
            f"{_attribute(name)} holds a value that is not a time of day (HH, HHMM, HHMMSS or HHMMSS.FFFFFF, "
            "hours 00 to 23, minutes 00 to 59, seconds 00 to 60, or a range of two): the node cannot match it"
        )
    return (time.replace(".", "") + padding * TIME_DIGITS)[:TIME_DIGITS]


def _is_time_of_day(time: str) -> bool:
    """Whether the hour, minute and second a TM value of :data:`TIME_FORM` gives (those it gives) are a clock's."""
    units = [int(time[start : start + 2]) for start in range(0, min(len(time), 6), 2)]
    return all(unit <= most for unit, most in zip(units, TIME_UNITS_MOST, strict=False))


def _plain(value: str, limit: int = 64) -> str:
    """A value a peer sent, for a refusal's sentence: as sent, unquoted, its unprintable characters as ``?``, cut to
    ``limit`` characters."""
    printable = "".join(c if c.isprintable() else "?" for c in value[:limit])
    return printable if len(value) <= limit else f"{printable}... ({len(value)} characters)"


def _attribute(column_name: str) -> str:
    """The DICOM keyword of the matching key stored in the column ``column_name``."""
    return next((keyword for keyword, key in KEYS.items() if key.column.key == column_name), column_name)


def _matching(column: Any, value: str) -> ColumnElement[bool]:
    """``column`` equal to ``value``, or matching it where it holds the wildcards ``*`` and ``?``; case counts in
    both, as it does in a single value match (AB-100 and ab-100 are two patients' IDs)."""
    if "*" in value or "?" in value:
        like = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").replace("*", "%").replace("?", "_")
        return _Wildcard(column, literal(like), literal(value.replace("[", "[[]")))
    return column == value


NAME_PADDING_REMOVED = 8
"""Empty components and spaces removed before each ``=`` of a stored name: a component group has at most four
empty trailing components, so eight leaves room for their padding."""


def _name_matching(column: Any, value: str) -> ColumnElement[bool]:
    """A person name ``column`` matching ``value`` (already without its empty trailing components,
    :func:`comparable_identity`): compared with the stored name without its own, case counting as in
    :func:`_matching`. A wildcard pattern also matches the name as stored (``DOE^JOHN^^*`` matches
    ``DOE^JOHN^^``). A value of fewer component groups than the stored name matches its first groups: a planning
    system that writes only the alphabetic group (``YAMADA^TAROU``) finds ``YAMADA^TAROU=山田^太郎=やまだ^たろう``.

    The trimmed name costs sixteen ``replace`` calls a row, so it is computed only for rows that already match
    :func:`_padded_pattern`, a plain match on the stored name that every name whose trimmed form matches also
    passes: the prefilter only saves work, it never adds or loses a match."""
    padded = _padded_pattern(value)
    if "*" in value and padded == value:  # DOE*: the stored name matching is enough (and the trimmed one adds none)
        return _matching(column, value)
    # the trimmed name, or its first groups: "<trimmed>=" starts with "<value>=" (YAMADA^TAROU=山田^太郎= does)
    trimmed = _matching(_trimmed_name(column).concat("="), value + "=*")
    as_stored = _matching(column, value) if "*" in value or "?" in value else column == value
    return or_(as_stored, and_(_matching(column, padded), trimmed))


def _padded_pattern(value: str) -> str:
    """A wildcard pattern that every stored name passes whose trimmed form (:func:`_trimmed_name`) matches
    ``value``: ``value`` with a ``*`` before each ``=`` and ``?`` and one at its end (``DOE^JOHN=YAMADA`` gives
    ``DOE^JOHN*=YAMADA*``; ``DOE*`` stays ``DOE*``).

    Trimming only takes ``^`` and spaces from just before an ``=`` and characters off the end, so the stored
    name is the trimmed one with text put back at those places. A ``*`` of ``value`` that spans such a place takes
    the text in too, and every other place is one the added ``*`` covers: the end, or just before an ``=`` that
    ``value`` matches with an ``=``, or with a ``?`` (a ``?`` may stand for an ``=``: ``DOE^JOHN?YAMADA*`` matches
    ``DOE^JOHN^^=YAMADA`` through its trimmed form). Without ``=`` or ``?``, a pattern ending in ``*`` is its own
    padded pattern."""
    padded = value.replace("=", "*=").replace("?", "*?")
    return padded if padded.endswith("*") else padded + "*"


def _trimmed_name(column: Any) -> ColumnElement[str]:
    """``column`` without empty trailing components, spaces and empty trailing groups, in SQL that SQLite and
    PostgreSQL both run (neither ``regexp_replace`` nor a Python function is on both): each ``replace`` round takes
    one ``^`` and one space off before each ``=``, then ``rtrim`` cuts the name's end. As
    :func:`comparable_identity` trims a query's name."""
    text: ColumnElement[str] = column
    for _ in range(NAME_PADDING_REMOVED):
        text = func.replace(func.replace(text, "^=", "="), " =", "=")
    return func.rtrim(text, "^= ")


class _Wildcard(FunctionElement[bool]):
    """``column`` matching a DICOM wildcard pattern (``*`` any run of characters, ``?`` one character), case
    sensitively on every database: ``(column, LIKE pattern, GLOB pattern)``. PostgreSQL's LIKE counts case;
    SQLite's ignores the case of ASCII letters, so SQLite uses GLOB (its ``*`` and ``?`` are DICOM's, and ``[``,
    its only other special character, is escaped as ``[[]``)."""

    type = Boolean()
    name = "dicom_wildcard"
    inherit_cache = True


@compiles(_Wildcard)
def _like(element: _Wildcard, compiler: SQLCompiler, **kw: Any) -> str:
    column, like, _glob = element.clauses
    return str(compiler.process(column.like(like, escape="\\"), **kw))


@compiles(_Wildcard, "sqlite")
def _glob(element: _Wildcard, compiler: SQLCompiler, **kw: Any) -> str:
    column, _like, glob = element.clauses
    return str(compiler.process(column.op("GLOB", is_comparison=True)(glob), **kw))


def _of_the_study_patient() -> ColumnElement[bool]:
    """Instances whose own patient is their study's: the same PatientID, and the same issuer (IssuerOfPatientID,
    UniversalEntityID), name, birth date and sex where both carry one, as the receiver and admission compare them
    (:meth:`~dicom_node.receive.header.StudyPatient.differing_keyword`). Another patient's image sent under this
    study's or series' UIDs (admission fails that series) is never served, so every answer and every sent instance
    is the patient it names. An instance whose patient is unknown (NULL: recorded before revision 0011, and its
    stored file could not be read when start-up filled in the others, :mod:`dicom_node.receive.backfill`) is never
    served: it cannot be shown to be the study's patient; nor is one whose patient values did not decode in their
    character set (recorded unknown, they would compare as not sent). A detail the instance's header did not carry
    is no difference."""
    return and_(
        Instance.patient_undecodable.is_(False),
        Instance.patient_id == func.coalesce(Study.patient_id, ""),
        _agrees(Instance.issuer_of_patient_id, Study.issuer_of_patient_id),
        _agrees(Instance.issuer_universal_entity_id, Study.issuer_universal_entity_id),
        _agrees(Instance.patient_birth_date, Study.patient_birth_date),
        _agrees(Instance.patient_sex, Study.patient_sex),
        _same_name(),
    )


def _agrees(instance_value: Any, study_value: Any) -> ColumnElement[bool]:
    """The instance's value is its study's, or one of them is empty (a value only one side sent is no conflict)."""
    return or_(
        func.coalesce(instance_value, "") == "", func.coalesce(study_value, "") == "", instance_value == study_value
    )


def _same_name() -> ColumnElement[bool]:
    """The instance's PatientName names its study's patient, by the rule of :mod:`db.names` (as the receiver and
    admission compare): either has no name, or the two share a component group and differ in none both carry,
    compared by their keys (:func:`db.names.name_key`, without letter case, empty trailing components or the
    difference between composed and decomposed letters). ``DOE^JOHN`` and ``Doe^John=...`` are one person,
    ``=山田^太郎`` and ``Yamada^Tarou=山田^太郎`` too; ``=山田^太郎`` and ``Yamada^Tarou`` share no group, and are
    taken as two. A name without its key (recorded by an older node since the upgrade) is served only where it is
    its study's name as written.

    The same stored text, as nearly every image has, is decided before any key is split."""
    mine = [_name_group(Instance.patient_name_key, number) for number in range(GROUPS)]
    theirs = [_name_group(Study.patient_name_key, number) for number in range(GROUPS)]
    return or_(
        Instance.patient_name == Study.patient_name,
        _no_name(Instance.patient_name),
        _no_name(Study.patient_name),
        and_(
            or_(*(and_(a != "", b != "") for a, b in zip(mine, theirs, strict=True))),
            *(or_(a == "", b == "", a == b) for a, b in zip(mine, theirs, strict=True)),
        ),
    )


def _no_name(column: Any) -> ColumnElement[bool]:
    """``column`` holds no name: NULL, or only spaces, ``^`` and ``=`` (:func:`db.names.name_key` gives None)."""
    return func.coalesce(func.rtrim(column, "^= "), "") == ""


def _name_group(key: Any, number: int) -> ColumnElement[str]:
    """Component group ``number`` (0 to 2) of a name key, which always holds three groups (two ``=``; text after a
    third stays in the third group)."""
    first = _Position(key, literal("="))
    if number == 0:
        return func.substr(key, 1, first - 1)
    rest = func.substr(key, first + 1)
    second = _Position(rest, literal("="))
    return func.substr(rest, 1, second - 1) if number == 1 else func.substr(rest, second + 1)


class _Position(FunctionElement[int]):
    """Where ``(text, part)``'s ``part`` first occurs in ``text``, from 1 (0: nowhere): ``instr`` on SQLite,
    ``strpos`` on PostgreSQL."""

    type = Integer()
    name = "dicom_position"
    inherit_cache = True


@compiles(_Position)
def _strpos(element: _Position, compiler: SQLCompiler, **kw: Any) -> str:
    return f"strpos({compiler.process(element.clauses, **kw)})"


@compiles(_Position, "sqlite")
def _instr(element: _Position, compiler: SQLCompiler, **kw: Any) -> str:
    return f"instr({compiler.process(element.clauses, **kw)})"


def _joined(level_conditions: list[ColumnElement[bool]]) -> Select[Any]:
    """The instances Query/Retrieve serves (of :func:`_served_series`, under their own patient) that meet
    ``level_conditions``: every match, count and retrieval is read from it."""
    return (
        select(Instance.id)
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(*_served_series(), _of_the_study_patient(), *level_conditions)
    )


WITHDRAWN_STATES = (JobState.FAILED, JobState.IGNORED)
"""States of a job whose results the node no longer stands behind once its series has received images after them
(a DONE series reopened by a late image whose re-run failed, was cancelled or set aside): those results were made
from images the series no longer is. Results of a series that only failed to be delivered, or whose run again
failed before it changed anything, still describe it and stay served."""


def _served_series() -> list[ColumnElement[bool]]:
    """Series Query/Retrieve answers and sends (read with an Instance row in the query): not purged; for a result
    series (SEG, SR, RTSTRUCT), not replaced by a later run of its job, and not stale: its job
    :data:`WITHDRAWN_STATES` while its source series holds an image recorded after this result (instance ids
    grow with every row recorded, on any host's clock). Read at each query, so a retry that sends them again serves
    them again; a re-run in progress leaves the earlier results served until its own are recorded."""
    later_image = aliased(Instance)
    stale = (
        select(later_image.id)
        .join(Job, Job.series_id == later_image.series_id)
        .where(Job.id == Series.source_job_id, Job.state.in_(WITHDRAWN_STATES), later_image.id > Instance.id)
    )  # one level below the query: correlated to its Series and Instance
    return [
        Series.purged_at.is_(None),
        Series.superseded_at.is_(None),
        or_(Series.source_job_id.is_(None), ~stale.exists()),
    ]


def withheld(session: Session, result: Series) -> bool:
    """Whether Query/Retrieve withholds the result series ``result`` as stale (:func:`_served_series`): not
    superseded or purged, yet none of its instances served."""
    if result.superseded_at is not None or result.purged_at is not None:
        return False
    served = select(Instance.id).join(Series, Instance.series_id == Series.id).where(Series.id == result.id)
    return (
        session.scalar(served.where(*_served_series()).limit(1)) is None and session.scalar(served.limit(1)) is not None
    )


MOST_SERIES_EXPLAINED = 3
"""How many series a retrieval that selected nothing names with the reason it is not served."""


def why_not_served(session: Session, identifier: Dataset) -> str | None:
    """For a retrieval that selected nothing, why the series it names are held but not served, in a sentence for the
    log and the audit trail (never for the peer: a planning system hears Success with no instances, as for any UID
    the node does not hold); None when it names none the node holds.

    The series are those named by SeriesInstanceUID, and those of the instances named by SOPInstanceUID.
    """
    series_uids, instance_uids = (  # keys below the level were not checked: their first UIDs only
        _listed(_value(identifier.get(keyword, "")))[:MAX_LISTED_UIDS]
        for keyword in ("SeriesInstanceUID", "SOPInstanceUID")
    )
    named = select(Series).where(
        or_(
            Series.series_instance_uid.in_(series_uids),
            Series.id.in_(select(Instance.series_id).where(Instance.sop_instance_uid.in_(instance_uids))),
        )
    )
    reasons = [
        reason
        for series in session.scalars(named.order_by(Series.id).limit(MOST_SERIES_EXPLAINED))
        if (reason := _why_series_not_served(session, series)) is not None
    ]
    return "; ".join(reasons) or None


def _why_series_not_served(session: Session, series: Series) -> str | None:
    uid = series.series_instance_uid
    if series.purged_at is not None:
        return f"series {uid} was purged (by retention or dicom-node purge) on {series.purged_at:%Y-%m-%d %H:%M} UTC"
    if series.superseded_at is not None:
        return (
            f"series {uid} holds results replaced by a later run of the same series on "
            f"{series.superseded_at:%Y-%m-%d %H:%M} UTC"
        )
    if series.source_job_id is not None and withheld(session, series):
        job = session.get(Job, series.source_job_id)
        state = job.state.value if job is not None else "FAILED"
        return (
            f"series {uid} holds results that no longer describe their series: it received images after them, "
            f"and is {state}"
        )
    return None


def matching_instances(
    session: Session, identifier: Dataset, *, for_retrieval: bool = False, limit: int | None = None
) -> list[Instance]:
    """Instances the identifier selects, in study, series and instance order (at most ``limit``).

    Raises
    ------
    QueryError
        On a bad level, or (``for_retrieval``) when the level's unique key is missing.
    """
    level = query_level(identifier)
    if for_retrieval:
        check_retrieval_keys(identifier, level)
    ids = _joined(conditions(identifier, level) + _level_scope(level))
    if for_retrieval and level == "PATIENT":
        _check_one_person(session, identifier, ids)
    query = (
        select(Instance)
        .join(Series, Instance.series_id == Series.id)
        .where(Instance.id.in_(ids))
        .order_by(Series.study_id, Series.series_number, Series.id, Instance.instance_number, Instance.id)
    )
    return list(session.scalars(query if limit is None else query.limit(limit)))


def _check_one_person(session: Session, identifier: Dataset, matched: Select[Any]) -> None:
    """A PATIENT-level retrieval sends one person's images, or nothing.

    Raises
    ------
    AmbiguousPatient
        Where its PatientID is held from several issuers and it names none, or where the studies it selects name
        different people (another name, birth date or sex under the same PatientID, :func:`_people`).
    """
    if not _names_an_issuer(identifier) and len(_ordered_keys(session, "PATIENT", matched, 2)) > 1:
        raise AmbiguousPatient(
            "the PatientID of this PATIENT-level retrieval belongs to more than one patient (the same ID from "
            "different issuers, IssuerOfPatientID or the UniversalEntityID of "
            "IssuerOfPatientIDQualifiersSequence), and the request names no issuer: nothing is sent; "
            "the requester must give the issuer, or retrieve by StudyInstanceUID"
        )
    people = _people(_held_studies(session, matched))
    if len(people) > 1:
        other = StudyPatient.of(people[1][0])
        differing = next(k for s in people[0] if (k := StudyPatient.of(s).differing_keyword(other)) is not None)
        raise AmbiguousPatient(
            f"the PatientID of this PATIENT-level retrieval is held for more than one person (its studies differ in "
            f"{differing}): nothing is sent; the requester must retrieve by StudyInstanceUID"
        )


def _names_an_issuer(identifier: Dataset) -> bool:
    """Whether a query names the issuer of its PatientID (IssuerOfPatientID, or the UniversalEntityID of
    IssuerOfPatientIDQualifiersSequence), other than by ``*``."""
    asked = (_value(identifier.get("IssuerOfPatientID", "")), _asked_universal_entity_id(identifier.get(QUALIFIERS)))
    return any(value not in ("", "*") for value in asked)


def check_retrieval_keys(identifier: Dataset, level: Level) -> None:
    """A C-MOVE/C-GET identifier selects by literal unique keys only.

    The level's unique key must be present, and it and every unique key above
    it that is given must be one or more literal values: an empty value, ``*``
    or ``?`` never satisfies a unique key (PS3.4 C.2.2.1.1: unique keys in
    retrievals use single value or UID list matching).

    Raises
    ------
    QueryError
        Naming the key and what is wrong with it.
    """
    if not _value(identifier.get(UNIQUE_KEYS[level], "")):
        raise QueryError(f"a {level} retrieval needs {UNIQUE_KEYS[level]}")
    for keyword in [UNIQUE_KEYS[lvl] for lvl in LEVELS[: LEVELS.index(level) + 1]]:
        value = _value(identifier.get(keyword, ""))
        if "*" in value or "?" in value:
            raise QueryError(f"{keyword} {shown(value)} has a wildcard; a retrieval needs literal unique keys")
        if keyword == UNIQUE_KEYS[level] and any(not part.strip() for part in value.split("\\")):
            raise QueryError(f"{keyword} has an empty value in its list; a retrieval needs literal unique keys")


NARROWING_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber")


def is_narrow(identifier: Dataset, level: Level) -> bool:
    """Whether a C-FIND looks up something the caller already knows, rather than browsing.

    Narrow: below PATIENT level, with a Study, Series or SOP Instance UID or an
    AccessionNumber at or above the query's level, given as literal values (no
    ``*`` or ``?``, no empty item in a list). A key below the query's level does
    not count: matching ignores it, so it would narrow nothing. Every other
    query (PATIENT level, or keys that are all empty, wildcards, dates or
    names) is *universal* and needs the ``find`` role.
    """
    if level == "PATIENT":
        return False
    depth = LEVELS.index(level)
    for keyword in NARROWING_KEYS:
        if LEVELS.index(KEYS[keyword].level) > depth:
            continue
        parts = _value(identifier.get(keyword, "")).split("\\")
        if all(part.strip() and "*" not in part and "?" not in part for part in parts):
            return True
    return False


def find(
    session: Session, identifier: Dataset, retrieve_ae_title: str, *, limit: int | None = None
) -> Iterator[Dataset]:
    """One response identifier per matching patient, study, series or instance, at most ``limit``.

    The matches are ordered and cut to ``limit`` by the database, so a broad query never
    loads more keys than it may answer. Each answer carries every key asked, those the node
    does not hold empty (:class:`_AnswerShape`).

    Raises
    ------
    QueryError
        If the identifier's level or a key's value cannot be understood, or it holds more than
        :data:`MAX_QUERY_KEYS` keys.
    """
    for response, _studies in find_disclosing(session, identifier, retrieve_ae_title, limit=limit):
        yield response


def find_disclosing(
    session: Session, identifier: Dataset, retrieve_ae_title: str, *, limit: int | None = None
) -> Iterator[tuple[Dataset, list[str] | None]]:
    """:func:`find`'s answers, each with, at PATIENT level, the StudyInstanceUIDs of the studies it discloses (those
    of the one person it names, which its counts count), for the audit trail; None below PATIENT level, where an
    answer names its own study."""
    level = query_level(identifier)
    check_width(identifier)
    matched = _joined(conditions(identifier, level) + _level_scope(level))
    shape = _AnswerShape.of(identifier, level)
    counts = _Counts(session)
    keys: Iterable[Any] = _ordered_keys(session, level, matched, limit)
    if level == "PATIENT":
        keys = islice((person for patient in keys for person in _people_matched(session, patient, matched)), limit)
    for key in keys:
        disclosed = _study_uids(session, key.study_ids) if level == "PATIENT" else None
        yield _response(session, level, key, shape, retrieve_ae_title, counts), disclosed


def _study_uids(session: Session, study_ids: Iterable[int]) -> list[str]:
    """The StudyInstanceUIDs of ``study_ids``, in their order of arrival."""
    query = select(Study.study_instance_uid).where(Study.id.in_(list(study_ids))).order_by(Study.id)
    return list(session.scalars(query))


MAX_QUERY_KEYS = 256
"""The most keys a C-FIND identifier may hold. The node fills about thirty (:data:`KEYS`, :data:`COUNTS`, the
level's unique keys, QueryRetrieveLevel, SpecificCharacterSet, RetrieveAETitle); a planning system or PACS asks
for a few dozen. An identifier of hundreds asks for what no answer could hold, and is refused."""

NEVER_ANSWERED_GROUPS = (0x0000, 0x0002)
"""Command and file meta elements: never part of an answer, even empty."""


def check_width(identifier: Dataset) -> None:
    """Refuse an identifier of more than :data:`MAX_QUERY_KEYS` keys.

    Raises
    ------
    QueryError
        Saying how many attributes it asks for, and how many the node answers.
    """
    asked = len(identifier)
    if asked > MAX_QUERY_KEYS:
        raise QueryError(
            f"the query asks for {asked} attributes; the node answers queries of at most {MAX_QUERY_KEYS} "
            f"(it holds about {len(KEYS) + len(COUNTS)} of them): the querying system must ask only for the "
            "attributes it needs"
        )


@dataclass(frozen=True)
class _AnswerShape:
    """What every answer to one query carries: the keys the node fills (held in its database, counted, or unique
    keys of the level), and one shared empty element for each other key asked (PS3.4 C.4.1.1.3.2: a key the SCP
    does not hold is answered with no value), private and unknown keys too (a private creator keeps its value,
    :func:`_unheld`). The empty ones are built once per query, so a peer asking for keys
    the node does not hold makes no answer wider in memory or work than a dictionary entry per key."""

    filled: tuple[str, ...]
    empty: dict[BaseTag, DataElement]
    non_ascii_creator: bool = False
    """Whether a private creator answered as asked (:func:`_unheld`) is not ASCII: the answer then declares UTF-8."""

    @classmethod
    def of(cls, identifier: Dataset, level: Level) -> _AnswerShape:
        depth = LEVELS.index(level)
        filled: list[str] = []
        unheld = Dataset()
        for element in identifier:
            keyword = element.keyword
            if element.tag.group in NEVER_ANSWERED_GROUPS or element.tag.element == 0 or keyword in SET_BY_THE_NODE:
                continue
            if not keyword:  # a private key (its creator answered as asked) or one no dictionary knows
                unheld.add(_unheld(element))
                continue
            spec = KEYS.get(keyword)
            if keyword in COUNTS or keyword == QUALIFIERS or (spec is not None and LEVELS.index(spec.level) <= depth):
                filled.append(keyword)
            else:
                setattr(unheld, keyword, "")
        unique = [keyword for keyword in _unique_keys_down_to(level) if keyword not in filled]  # held: in KEYS
        non_ascii = any(e.tag.is_private_creator and not str(e.value or "").isascii() for e in unheld)
        return cls(tuple(filled + unique), {element.tag: element for element in unheld}, non_ascii)


def _unheld(element: DataElement) -> DataElement:
    """How a key without a keyword is answered (PS3.4 C.4.1.1.3: every key asked is answered): a private creator
    (gggg,0010-00FF) with the value asked, since it names the block its private keys are read in; any other, a
    private key or one no dictionary knows, empty with its VR (the node holds no private or unknown attribute)."""
    if element.tag.is_private_creator:
        return DataElement(element.tag, element.VR, element.value)
    return DataElement(element.tag, element.VR, None)


SET_BY_THE_NODE = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"})
"""Keys every answer carries as the node sets them, whatever the identifier gave."""


def _level_scope(level: Level) -> list[ColumnElement[bool]]:
    """What a level's answers may hold besides the keys: a PATIENT-level answer is a patient, named by a PatientID,
    so studies stored without one are left out (each is its own patient, known only by its study: folding them
    into one answer would merge unrelated people). They are answered at STUDY level and below."""
    if level != "PATIENT":
        return []
    return [Study.patient_id.is_not(None), Study.patient_id != ""]


def _ordered_keys(session: Session, level: Level, matched: Select[Any], limit: int | None) -> list[Any]:
    """The keys of the matches, in answer order, at most ``limit``: patients (PatientID, IssuerOfPatientID and the
    UniversalEntityID of IssuerOfPatientIDQualifiersSequence, unknown first) or row ids."""
    if level == "PATIENT":
        patients = (
            matched.with_only_columns(Study.patient_id, Study.issuer_of_patient_id, Study.issuer_universal_entity_id)
            .distinct()
            .order_by(None)
            .subquery()
        )
        # "IS NULL" first, not NULLS LAST: SQLite before 3.30 lacks it; outside the DISTINCT, PostgreSQL allows it
        by_patient = select(
            patients.c.patient_id, patients.c.issuer_of_patient_id, patients.c.issuer_universal_entity_id
        ).order_by(
            patients.c.patient_id.is_(None),
            patients.c.patient_id,
            patients.c.issuer_of_patient_id.is_not(None),
            patients.c.issuer_of_patient_id,
            patients.c.issuer_universal_entity_id.is_not(None),
            patients.c.issuer_universal_entity_id,
        )
        return [tuple(row) for row in session.execute(by_patient if limit is None else by_patient.limit(limit))]
    key_column = {"STUDY": Study.id, "SERIES": Series.id, "IMAGE": Instance.id}[level]
    order = {
        "STUDY": (Study.study_date, Study.study_time, Study.id),
        "SERIES": (Series.study_id, Series.series_number, Series.id),
        "IMAGE": (Instance.series_id, Instance.instance_number, Instance.id),
    }[level]
    query = select(key_column).where(key_column.in_(matched.with_only_columns(key_column).order_by(None)))
    query = query.order_by(*order)
    return list(session.scalars(query if limit is None else query.limit(limit)))


def _response(
    session: Session,
    level: Level,
    key: Any,
    shape: _AnswerShape,
    retrieve_ae_title: str,
    counts: _Counts,
) -> Dataset:
    instance = series = study = person = None
    if level == "IMAGE":
        instance = session.get_one(Instance, key)
        series = instance.series
        study = series.study
    elif level == "SERIES":
        series = session.get_one(Series, key)
        study = series.study
    elif level == "STUDY":
        study = session.get_one(Study, key)
    else:
        person = key
        study = person.study
    sources = {"PATIENT": study, "STUDY": study, "SERIES": series, "IMAGE": instance}
    response = Dataset(dict(shape.empty))  # the answer's own entries; each filled key gets an element of its own
    response.QueryRetrieveLevel = level
    for keyword in shape.filled:
        if keyword in COUNTS:
            setattr(response, keyword, counts.value(keyword, study, series, person))
            continue
        if keyword == QUALIFIERS:
            response.IssuerOfPatientIDQualifiersSequence = _answered_qualifiers(study)
            continue
        spec = KEYS.get(keyword)
        value = None
        if keyword == "AccessionNumber" and series is not None:  # the series' order (a study may carry several)
            value = series.accession_number or study.accession_number
        elif spec is not None and LEVELS.index(spec.level) <= LEVELS.index(level):
            source = sources[spec.level]
            value = getattr(source, spec.column.key) if source is not None else None
        setattr(response, keyword, value if value is not None else "")
    if level == "PATIENT" and QUALIFIERS not in shape.filled and study.issuer_universal_entity_id:
        # the answers of one PatientID from two universal issuers must tell the patients apart, as IssuerOfPatientID
        response.IssuerOfPatientIDQualifiersSequence = _answered_qualifiers(study)
    response.RetrieveAETitle = retrieve_ae_title
    if any(not str(response[keyword].value).isascii() for keyword in shape.filled) or shape.non_ascii_creator:
        response.SpecificCharacterSet = "ISO_IR 192"
    return response


def _answered_qualifiers(study: Study) -> Sequence:
    """The study's IssuerOfPatientIDQualifiersSequence as answered: one item with its UniversalEntityID and
    UniversalEntityIDType, or none where the study has no universal issuer."""
    if not study.issuer_universal_entity_id:
        return Sequence()
    item = Dataset()
    item.UniversalEntityID = study.issuer_universal_entity_id
    item.UniversalEntityIDType = study.issuer_universal_entity_id_type or ""
    return Sequence([item])


def _of_patient(
    patient_id: str | None, issuer_of_patient_id: str | None, issuer_universal_entity_id: str | None = None
) -> ColumnElement[bool]:
    """Studies of one patient: this PatientID from this issuer, in both forms (an unknown one being a value of its
    own)."""
    return and_(
        _equal_or_both_null(Study.patient_id, patient_id),
        _equal_or_both_null(Study.issuer_of_patient_id, issuer_of_patient_id),
        _equal_or_both_null(Study.issuer_universal_entity_id, issuer_universal_entity_id),
    )


def _equal_or_both_null(column: Any, value: str | None) -> ColumnElement[bool]:
    return column.is_(None) if value is None else column == value


def _unique_keys_down_to(level: Level) -> list[str]:
    """The keys every answer carries: the level's unique keys and those above it (below PATIENT, the Study Root
    ones); a PATIENT-level answer also carries IssuerOfPatientID (empty when none), since one PatientID from two
    issuers is two patients and the answers must tell them apart."""
    keys = [UNIQUE_KEYS[lvl] for lvl in LEVELS[1 : LEVELS.index(level) + 1]]
    return (["PatientID", "IssuerOfPatientID"] if level == "PATIENT" else []) + keys


class _Counts:
    """The counts of one query's answers, each read once per study, series or person and key (the answers of one
    study share them), and the people of each PatientID the patient counts are counted for."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._values: dict[tuple[str, Any], Any] = {}
        self._people: dict[tuple[str | None, ...], list[list[Study]]] = {}

    def value(self, keyword: str, study: Study, series: Series | None, person: _Person | None) -> Any:
        """A NumberOf...Related..., ModalitiesInStudy or SOPClassesInStudy value: a patient's over the studies of
        ``person`` (PATIENT level) or of the person ``study`` names, a series' over ``series`` (empty above SERIES
        level), the others over ``study``."""
        scope: ColumnElement[bool]
        if keyword.startswith("NumberOfPatientRelated"):
            studies = person.study_ids if person is not None else self._person_of(study)
            key: tuple[str, Any] = (keyword, studies)
            scope = Study.id.in_(studies)
        elif keyword.startswith("NumberOfSeriesRelated"):
            if series is None:
                return ""
            key, scope = (keyword, ("series", series.id)), Series.id == series.id
        else:
            key, scope = (keyword, study.id), Study.id == study.id
        if key not in self._values:
            self._values[key] = _count(self._session, keyword, scope)
        return self._values[key]

    def _person_of(self, study: Study) -> tuple[int, ...]:
        """The studies held of the person ``study`` names (:func:`_people`); a study without a PatientID is its own
        patient, never counted with the other studies that lack one."""
        if not study.patient_id:
            return (study.id,)
        patient = (study.patient_id, study.issuer_of_patient_id, study.issuer_universal_entity_id)
        if patient not in self._people:
            self._people[patient] = _people(_held_studies(self._session, _joined([_of_patient(*patient)])))
        ids = (tuple(other.id for other in person) for person in self._people[patient])
        return next((person for person in ids if study.id in person), (study.id,))


def _count(session: Session, keyword: str, scope: ColumnElement[bool]) -> Any:
    """A NumberOf...Related..., ModalitiesInStudy or SOPClassesInStudy value, over the instances served in
    ``scope``."""
    held = _joined([scope])
    if keyword == "ModalitiesInStudy":
        return sorted(v for v in session.execute(held.with_only_columns(Series.modality).distinct()).scalars() if v)
    if keyword == "SOPClassesInStudy":
        return sorted(session.execute(held.with_only_columns(Instance.sop_class_uid).distinct()).scalars())
    counted = {"Studies": Study.id, "Series": Series.id, "Instances": Instance.id}[keyword.rpartition("Related")[2]]
    return int(session.execute(held.with_only_columns(func.count(distinct(counted))).order_by(None)).scalar_one())


@dataclass(frozen=True)
class _Person:
    """One person a PATIENT-level query found: the study answered for them (the newest of their studies that
    matched the query) and every study held under their PatientID that names them (what their counts count)."""

    study: Study
    study_ids: tuple[int, ...]


def _people_matched(session: Session, patient: tuple[str | None, ...], matched: Select[Any]) -> list[_Person]:
    """The people of one patient (a PatientID from one issuer) whose studies ``matched`` holds: a PatientID whose
    studies name different people (:func:`_people`) is answered once for each person the query matched, each answer
    taken from that person's own studies, never one person's name with another's studies."""
    of_patient = _of_patient(*patient)
    hits = set(session.scalars(matched.with_only_columns(Study.id).where(of_patient).distinct()))
    found = []
    for person in _people(_held_studies(session, _joined([of_patient]))):
        answered = [study for study in person if study.id in hits]
        if answered:
            found.append(_Person(answered[-1], tuple(study.id for study in person)))
    return found


def _held_studies(session: Session, instances: Select[Any]) -> list[Study]:
    """The studies of the instances ``instances`` selects (a :func:`_joined` selection), oldest first."""
    return list(
        session.scalars(select(Study).where(Study.id.in_(instances.with_only_columns(Study.id))).order_by(Study.id))
    )


def _people(studies: Iterable[Study]) -> list[list[Study]]:
    """``studies`` grouped by the person they name, compared as admission compares a series with its study
    (:meth:`StudyPatient.differing_keyword`): the same PatientID and issuer, and no name (group by group, case
    aside), birth date or sex that both carry and that differ. A study joins the first group all of whose studies
    name its patient, so two studies that differ are never in one group (one that leaves a detail empty may fit
    two, and is counted with the first)."""
    people: list[list[Study]] = []
    for study in studies:
        patient = StudyPatient.of(study)
        group = next((p for p in people if all(StudyPatient.of(o).differing_keyword(patient) is None for o in p)), None)
        if group is None:
            people.append([study])
        else:
            group.append(study)
    return people
