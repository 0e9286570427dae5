"""dicom_node_instances_refused_total keeps its label set for the process' lifetime: no series shrinks between two
scrapes when a new kind of reason appears."""

from __future__ import annotations

from dicom_node.console.metrics import MAX_REFUSAL_KINDS, bounded_refusal_tally


def test_a_new_reason_kind_never_makes_a_labelled_series_or_other_go_down():
    """Before, a 21st kind more frequent than the rarest pushed that one into "other" between scrapes: its series
    fell from 10 to nothing, and "other" jumped by refusals that never happened."""
    rows = [(0xC000, f"Reason number{chr(65 + k)} is wrong", 10 + k) for k in range(20)]
    labelled: set[str] = set()
    first = bounded_refusal_tally(rows, labelled)
    second = bounded_refusal_tally([*rows, (0xC000, "Another thing entirely wrong", 11)], labelled)
    third = bounded_refusal_tally([*rows, (0xC000, "Another thing entirely wrong", 500)], labelled)
    assert len({kind for _code, kind in first}) == MAX_REFUSAL_KINDS
    for key, count in first.items():
        assert second[key] >= count and third[key] >= second[key], key
    assert second[("0xC000", "other")] == first[("0xC000", "other")] + 11
    assert set(third) == set(first)  # the new kind, however frequent, stays in "other" until the process restarts
