"""Configuration: YAML, environment overrides, and errors that name the key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from dicom_node.config import ConfigError, load_settings
from tests.conftest import DICOM_NODE, ROOT


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_config_is_valid():
    settings = load_settings(ROOT / "config.yaml")
    assert settings.network.ae_title == "DICOMNODE"
    assert [rule.name for rule in settings.rules] == ["ct-axial", "everything-else"]


def test_environment_overrides_file_per_key(tmp_path, monkeypatch):
    path = write(tmp_path, {"network": {"ae_title": "FROMFILE", "port": 104}})
    monkeypatch.setenv("DICOM_NODE_NETWORK__PORT", "11113")
    monkeypatch.setenv("DICOM_NODE_NETWORK__ALLOWED_CALLING_AE_TITLES", '["PACS", "CT01"]')

    settings = load_settings(path)

    assert settings.network.port == 11113
    assert settings.network.ae_title == "FROMFILE"  # untouched keys keep the file's value
    assert settings.network.allowed_calling_ae_titles == ["PACS", "CT01"]


def test_relative_storage_directory_is_relative_to_config_file(tmp_path):
    settings = load_settings(write(tmp_path, {"storage": {"directory": "store"}}))
    assert settings.storage.directory == tmp_path / "store"
    assert settings.database_url == f"sqlite:///{tmp_path / 'store' / 'dicom-node.db'}"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"network": {"port": 70000}}, "network.port: Input should be less than or equal to 65535"),
        ({"network": {"ae_title": "A" * 17}}, "network.ae_title"),
        ({"network": {"prot": 104}}, "network.prot: Extra inputs are not permitted"),
        ({"rules": [{"name": "x", "action": "process"}]}, "action 'process' needs a model"),
        (
            {"rules": [{"name": "x", "action": "ignore", "destinations": ["nowhere"]}]},
            "unknown destination 'nowhere'",
        ),
        ({"rules": [{"name": "x", "action": "ignore", "match": {"series_description": "("}}]}, "not a valid regular"),
        (
            {"rules": [{"name": "x", "action": "ignore", "match": {"slice_thickness": {"min": 5, "max": 1}}}]},
            "min (5.0) is greater than max",
        ),
    ],
)
def test_invalid_value_names_the_key(tmp_path, data, expected):
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, data))
    assert expected in str(error.value)


def test_cli_reports_bad_environment_value_without_traceback(tmp_path):
    path = write(tmp_path, {})
    result = subprocess.run(
        [DICOM_NODE, "config", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        env={"DICOM_NODE_NETWORK__PORT": "not-a-port", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "network.port" in result.stderr and "DICOM_NODE_NETWORK__PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.yaml")
