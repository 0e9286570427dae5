"""`python -m dicom_node`: the same as the `dicom-node` command."""

from dicom_node.cli import app

app()
