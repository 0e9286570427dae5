"""Routing decisions: the guard first, then the first matching rule."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dicom_node import MANUFACTURER
from dicom_node.config import Rule
from dicom_node.routing import SeriesFacts, decide

CT = SeriesFacts(
    modality="CT",
    series_description="Abdomen 1.5 mm",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    slice_thickness=1.5,
    number_of_images=300,
    calling_ae_title="PACS",
    body_part_examined="ABDOMEN",
    manufacturer="SIEMENS",
    sop_class_uids=frozenset({"1.2.840.10008.5.1.4.1.1.2"}),
)


def rule(name: str, action: str = "process", **match) -> Rule:
    return Rule(name=name, action=action, model="baseline" if action == "process" else None, match=match)


def test_first_matching_rule_wins():
    rules = [rule("thin", slice_thickness={"max": 1.0}), rule("abdomen", series_description="(?i)abd"), rule("any")]
    assert decide(rules, CT).rule_name == "abdomen"


@pytest.mark.parametrize(
    ("match", "matches"),
    [
        ({"modality": "CT"}, True),
        ({"modality": ["MR", "PT"]}, False),
        ({"image_type": ["axial"]}, True),
        ({"image_type": ["AXIAL", "DERIVED"]}, False),
        ({"slice_thickness": {"min": 0.5, "max": 2}}, True),
        ({"number_of_images": {"min": 400}}, False),
        ({"calling_ae_title": "pacs"}, True),
        ({"body_part_examined": ["CHEST"]}, False),
        ({"series_description": "^Abdomen"}, True),
    ],
)
def test_each_condition(match, matches):
    decision = decide([rule("r", **match)], CT)
    assert (decision.action == "process") is matches


def test_no_match_is_ignored_with_reason():
    decision = decide([rule("mr", modality="MR")], CT)
    assert (decision.action, decision.reason) == ("ignore", "no routing rule matched")


def test_ignore_rule_ignores():
    decision = decide([rule("skip", action="ignore", calling_ae_title="PACS"), rule("any")], CT)
    assert decision.action == "ignore" and decision.rule_name == "skip"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"modality": "MR"}, "modality MR is not CT"),
        ({"manufacturer": MANUFACTURER}, "created by this node"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "localizer"),
        ({"modality": "CT", "sop_class_uids": frozenset({"1.2.840.10008.5.1.4.1.1.66.4"})}, "non-CT-image SOP classes"),
    ],
)
def test_guard_overrides_a_process_rule(change, reason):
    decision = decide([rule("everything")], replace(CT, **change))
    assert decision.action == "ignore"
    assert reason in decision.reason
