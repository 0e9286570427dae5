"""DICOM networking and the service: receive, route, dispatch."""

__version__ = "0.1.0"

MANUFACTURER = "dicom-node"
"""Manufacturer written into the node's own outputs; series carrying it are never processed."""
