"""Whether two PatientNames name one person: the one rule by which the receiver, the shared study claims, the study's
row, admission, Query/Retrieve and the console compare names.

A name is up to three component groups (alphabetic, ideographic, phonetic: ``Yamada^Tarou=山田^太郎=やまだ^たろう``).
Two names are one person's when they share at least one group that both carry and every group both carry is the
same, compared without letter case, empty trailing components or surrounding spaces, and with composed and
decomposed letters (``ü`` written as one character or as ``u`` and a combining diaeresis) as one. A group only one
side carries is no difference (a workstation writing only ``YAMADA^TAROU``); two names that share no group
(``=山田^太郎`` and ``Tanaka^Ichiro``) cannot be shown to be one person, so they are two. An empty name is no name:
it differs from none."""

from __future__ import annotations

import unicodedata
from itertools import zip_longest

GROUPS = 3
"""Component groups of a name; text after a third ``=`` (which admission refuses) stays in the third group."""
MAX_NAME_LENGTH = 324
"""Characters the database keeps of a name (``studies.patient_name``): a study's name completed from two series
never grows past it."""


def name_groups(value: str | None) -> list[str]:
    """The component groups of a name as written, each without surrounding spaces and empty trailing components
    (``DOE^JOHN^^ `` is ``DOE^JOHN``); at most :data:`GROUPS`."""
    return [group.strip(" ").rstrip("^ ") for group in (value or "").split("=", GROUPS - 1)]


def name_key(value: str | None) -> str | None:
    """A name as :func:`other_person` compares it: its :data:`GROUPS` groups joined by ``=`` (empty ones left
    empty), each in Unicode's canonical caseless form; None for an empty name. The database keeps it beside each
    name, so Query/Retrieve compares names in SQL exactly as this module does."""
    keys = [_caseless(group) for group in name_groups(value)]
    if not any(keys):
        return None
    return "=".join(keys + [""] * (GROUPS - len(keys)))


def _caseless(text: str) -> str:
    """Canonical caseless form (Unicode D145): ``Ü``, ``ü`` and ``u`` with a combining diaeresis are one letter."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())


def other_person(recorded: str | None, received: str | None) -> bool:
    """Whether two names name two people: both carry a name, and they share no group both carry, or differ in one
    (see the module's rule)."""
    first, second = name_key(recorded), name_key(received)
    if first is None or second is None:
        return False
    shared = [(a, b) for a, b in zip(first.split("=", 2), second.split("=", 2), strict=True) if a and b]
    return not shared or any(a != b for a, b in shared)


def completed_name(recorded: str | None, received: str | None) -> str | None:
    """``recorded`` with the component groups it lacks taken, as written, from ``received``, a name of the same
    person: a study's name once a series carries a group its earlier series left out, so a later series naming
    another person in that group is told apart. ``recorded`` itself where it lacks none of ``received``'s groups,
    where the two are two people, or where the whole would be longer than :data:`MAX_NAME_LENGTH`."""
    if other_person(recorded, received) or name_key(received) is None:
        return recorded
    mine, theirs = ((value or "").split("=", GROUPS - 1) for value in (recorded, received))
    taken = [
        own if own.strip(" ").rstrip("^ ") else other.strip(" ")
        for own, other in zip_longest(mine, theirs, fillvalue="")
    ]
    completed = "=".join(taken).rstrip("= ")
    if name_key(completed) == name_key(recorded) or len(completed) > MAX_NAME_LENGTH:
        return recorded
    return completed
