"""Routing: decide what happens to a complete series, from the rules in config.yaml.

Before any rule, a hard guard keeps the node from processing what it must never
process, whatever the rules say: non-CT series (most of their instances not CT
images), series without CT images, localizers, and the node's own outputs (so a
PACS that forwards everything back to the node makes no loop). A CT series that
also holds other objects goes on to admission, which refuses it naming them.
Then the first rule whose every condition holds decides; no match means IGNORED.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Instance, Series
from dicom_node import MANUFACTURER
from dicom_node.config import Range, Rule, rule_pattern

CT_IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
    }
)


@dataclass(frozen=True)
class SeriesFacts:
    """What the rules see of a series (image-level values summarised over its instances)."""

    modality: str | None
    series_description: str | None
    image_type: tuple[str, ...]
    slice_thickness: float | None
    number_of_images: int
    calling_ae_title: str | None
    body_part_examined: str | None
    manufacturer: str | None
    sop_class_uids: frozenset[str]


@dataclass(frozen=True)
class Decision:
    action: Literal["process", "ignore"]
    reason: str
    rule_name: str | None = None
    model: str | None = None
    destinations: tuple[str, ...] = ()


def series_facts(session: Session, series: Series) -> SeriesFacts:
    """Summarise a series from its instances: the most common ImageType, the median thickness."""
    rows = session.execute(
        select(Instance.image_type, Instance.slice_thickness, Instance.sop_class_uid, Instance.number_of_frames).where(
            Instance.series_id == series.id
        )
    ).all()
    image_types = Counter(row.image_type for row in rows if row.image_type)
    thicknesses = [row.slice_thickness for row in rows if row.slice_thickness is not None]
    images = sum(row.number_of_frames or 1 for row in rows)
    ct_images = sum(row.sop_class_uid in CT_IMAGE_SOP_CLASSES for row in rows)
    others = len(rows) - ct_images
    return SeriesFacts(
        # the series' Modality is its first instance's: where most instances are CT images and others are not, a
        # stray object (an MR image, a dose screen) sent first decides nothing: the series is CT, and admission
        # names the stray one
        modality="CT" if 0 < others < ct_images else series.modality,
        series_description=series.series_description,
        image_type=tuple(image_types.most_common(1)[0][0].split("\\")) if image_types else (),
        slice_thickness=statistics.median(thicknesses) if thicknesses else None,
        number_of_images=images,
        calling_ae_title=series.calling_ae_title,
        body_part_examined=series.body_part_examined,
        manufacturer=series.manufacturer,
        sop_class_uids=frozenset(row.sop_class_uid for row in rows),
    )


def never_process_reason(facts: SeriesFacts) -> str | None:
    """Why this series must not be processed whatever the rules say, or None."""
    if (facts.modality or "").upper() != "CT":
        return f"modality {facts.modality or '(none)'} is not CT; only CT series are processed"
    if facts.manufacturer == MANUFACTURER:
        return "series was created by this node (its own output)"
    if not facts.sop_class_uids & CT_IMAGE_SOP_CLASSES:
        return (
            f"series holds no CT images (only {', '.join(sorted(sop_class_name(uid) for uid in facts.sop_class_uids))})"
        )
    if "LOCALIZER" in (value.upper() for value in facts.image_type):
        return "series is a localizer (ImageType LOCALIZER)"
    return None


def sop_class_name(uid: str) -> str:
    """'Secondary Capture Image Storage': a SOP Class UID by its name where the standard gives one, else the UID."""
    name = UID(uid).name
    return name if name and name != uid else f"SOP Class UID {uid}"


def rule_matches(rule: Rule, facts: SeriesFacts) -> bool:
    """True when every condition the rule sets holds for the series."""
    return not unmet_conditions(rule, facts)


def unmet_conditions(rule: Rule, facts: SeriesFacts) -> list[str]:
    """The rule's conditions the series does not meet, each as a phrase naming the attribute and its value."""
    match = rule.match
    unmet = []
    if match.modality is not None and not _in(facts.modality, match.modality):
        unmet.append(f"Modality {facts.modality or '(none)'} is not {' or '.join(match.modality)}")
    if (
        match.series_description is not None
        and rule_pattern(match.series_description).search(facts.series_description or "") is None
    ):
        unmet.append(f"SeriesDescription {facts.series_description or ''!r} does not match its pattern")
    if match.image_type is not None:
        lacking = [v for v in match.image_type if v.upper() not in {t.upper() for t in facts.image_type}]
        if lacking:
            given = "\\".join(facts.image_type) or "(none)"
            unmet.append(f"ImageType {given} lacks {' and '.join(lacking)}")
    if match.slice_thickness is not None and not match.slice_thickness.contains(facts.slice_thickness):
        unmet.append(
            "the series gives no SliceThickness it can be judged by"
            if facts.slice_thickness is None or math.isnan(facts.slice_thickness)
            else f"SliceThickness {facts.slice_thickness:g} mm is {_outside(match.slice_thickness, ' mm')}"
        )
    if match.number_of_images is not None and not match.number_of_images.contains(facts.number_of_images):
        unmet.append(f"{facts.number_of_images} images is {_outside(match.number_of_images, '')}")
    if match.calling_ae_title is not None and not _in(facts.calling_ae_title, match.calling_ae_title):
        unmet.append(
            f"it came from {facts.calling_ae_title or '(no AE title)'}, not {' or '.join(match.calling_ae_title)}"
        )
    if match.body_part_examined is not None and not _in(facts.body_part_examined, match.body_part_examined):
        unmet.append(
            f"BodyPartExamined {facts.body_part_examined or '(none)'} is not {' or '.join(match.body_part_examined)}"
        )
    return unmet


def _outside(bounds: Range, unit: str) -> str:
    """'under 10', 'over 5 mm' or 'outside 0.5-5 mm', for a value the bounds do not contain."""
    if bounds.min is not None and bounds.max is not None:
        return f"outside {bounds.min:g}-{bounds.max:g}{unit}"
    if bounds.min is not None:
        return f"under {bounds.min:g}{unit}"
    return f"over {bounds.max:g}{unit}"


def _not_processed_because(skipped: list[tuple[Rule, list[str]]]) -> str:
    """Why the ``process`` rules before the decision did not take the series (at most three named), or ''."""
    if not skipped:
        return ""
    named = [f"rule {rule.name!r} did not match: {'; '.join(unmet)}" for rule, unmet in skipped[:3]]
    more = f"; {len(skipped) - 3} more process rules did not match" if len(skipped) > 3 else ""
    return f" ({'; '.join(named)}{more})"


def decide(rules: Sequence[Rule], facts: SeriesFacts) -> Decision:
    """The guard, then the first matching rule; no match ignores the series."""
    guard = never_process_reason(facts)
    skipped: list[tuple[Rule, list[str]]] = []  # process rules that did not match, and why
    for rule in rules:
        unmet = unmet_conditions(rule, facts)
        if unmet:
            if rule.action == "process":
                skipped.append((rule, unmet))
            continue
        if rule.action == "ignore":
            because = f" (not processed: {guard})" if guard else _not_processed_because(skipped)
            return Decision("ignore", f"rule {rule.name!r}: ignore{because}", rule_name=rule.name)
        if guard:
            return Decision("ignore", f"not processed: {guard}", rule_name=rule.name)
        return Decision(
            "process",
            f"rule {rule.name!r}",
            rule_name=rule.name,
            model=rule.model,
            destinations=tuple(rule.destinations),
        )
    if guard:
        return Decision("ignore", f"not processed: {guard}")
    return Decision("ignore", f"no routing rule matched{_not_processed_because(skipped)}")


def _in(value: str | None, allowed: Sequence[str]) -> bool:
    """Whether ``value``, or any of its values where it holds several (``HEAD\\NECK``, though these attributes
    allow one), is one of ``allowed``: an ignore rule on HEAD must not let such a series through to a later
    rule. The guard still refuses a Modality that is not CT alone."""
    if value is None:
        return False
    return bool({v.strip().upper() for v in value.split("\\")} & {a.strip().upper() for a in allowed})
