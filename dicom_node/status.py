"""DICOM status codes the node answers with (PS3.4 Annex B and C)."""

SUCCESS = 0x0000
# Storage (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# Generic
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111  # a copy of a stored instance with other pixel data
