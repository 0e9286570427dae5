"""Encoding results as DICOM objects: segmentations (SEG), measurement reports (SR), RTSTRUCT."""
