"""Reports (SRs) and the segmentations they report on: a peer gets a report only with every SEG it names.

The node's measurement SRs list their SEG as evidence (CurrentRequestedProcedureEvidenceSequence). Sending such
an SR to a destination or peer that lacks the SEG would leave it holding a report on a segmentation it never gets
(:func:`dicom_node.dispatch.send_files` holds it back; a retrieval leaves it out:
:mod:`dicom_node.retrieve.scp`). So SEGs go before SRs, and each SR is sent or left out once its SEGs' fate is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

SEGMENTATION_CLASSES = "1.2.840.10008.5.1.4.1.1.66."  # Segmentation and Label Map Segmentation Storage among them
SR_CLASSES = "1.2.840.10008.5.1.4.1.1.88."  # the Structured Report storage SOP classes


def is_segmentation(sop_class_uid: str) -> bool:
    return sop_class_uid.startswith(SEGMENTATION_CLASSES)


def is_report(sop_class_uid: str) -> bool:
    return sop_class_uid.startswith(SR_CLASSES)


def evidence_uids(path: str) -> list[str]:
    """The SOP Instance UIDs an SR lists as evidence (CurrentRequestedProcedureEvidenceSequence); none for a file
    that cannot be read (its own send says so)."""
    try:
        dataset = dcmread(path, stop_before_pixels=True, specific_tags=["CurrentRequestedProcedureEvidenceSequence"])
    except (OSError, InvalidDicomError, ValueError):
        return []
    return [
        str(instance.get("ReferencedSOPInstanceUID", ""))
        for study in dataset.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedSOPSequence", [])
    ]


@dataclass
class SegmentationsNotSent:
    """The SEGs of one retrieval its peer does not get as themselves, each with a clause saying why; ``failed``:
    those that could not be sent at all (rather than going as, or beside, their BINARY twin)."""

    why: dict[str, str] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    twins: dict[str, str] = field(default_factory=dict)
    """LABELMAP SEG -> the BINARY twin the peer gets instead (or beside it)."""
    reported: set[str] = field(default_factory=set)
    """The SEGs the SRs selected for the retrieval name as evidence (read only where a SEG has a twin)."""

    def note(self, sop_instance_uid: str, why: str, *, failed: bool = False, twin: str | None = None) -> None:
        self.why[sop_instance_uid] = why
        if failed:
            self.failed.add(sop_instance_uid)
        elif twin is not None:
            self.twins[sop_instance_uid] = twin

    def measured_elsewhere(self, sop_instance_uid: str) -> bool:
        """Whether the peer gets the measurements on SEG ``sop_instance_uid`` all the same: it gets its BINARY twin,
        and an SR on that twin is selected too."""
        return self.twins.get(sop_instance_uid) in self.reported

    def named_by(self, report_path: str) -> list[str]:
        """The SEGs noted here that the SR at ``report_path`` names as evidence (none when none were noted)."""
        if not self.why:
            return []
        return [uid for uid in dict.fromkeys(evidence_uids(report_path)) if uid in self.why]
