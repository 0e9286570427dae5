"""The node's own TLS files at start: a certificate expired or not valid yet refuses the start (exit 1: a later try
may succeed), one that expires soon and a private key others may read are warned about, at start and, for the
certificate, while the node runs; relative paths are taken from the config file's folder."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from dicom_node import security
from dicom_node.config import Settings, load_settings
from dicom_node.security import certificate_lifetime, tls_file_warnings
from tests.conftest import DICOM_NODE, Certificates, require_tool
from tests.test_cli_errors import NODE, assert_says, free_port, run, write_config


def certificate_valid(folder: Path, start: str, end: str) -> tuple[Path, Path]:
    """A self-signed certificate (and its key) valid from ``start`` to ``end`` (YYYYMMDDHHMMSSZ): `openssl ca` takes
    dates, where `openssl req -days` takes only a length of time from now."""
    folder.mkdir(parents=True)
    (folder / "ca.cnf").write_text(
        "[ca]\ndefault_ca = c\n[c]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\ndefault_md = sha256\n"
        "policy = p\n[p]\ncommonName = supplied\n"
    )
    (folder / "index.txt").write_text("")
    (folder / "serial").write_text("01\n")
    openssl = require_tool("openssl")
    request = ["req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr"]
    signing = ["ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", "node.key", "-in", "node.csr"]
    for arguments in (
        [*request, "-subj", "/CN=node"],
        [*signing, "-out", "node.pem", "-startdate", start, "-enddate", end],
    ):
        subprocess.run([openssl, *arguments], check=True, capture_output=True, cwd=folder)
    (folder / "node.key").chmod(0o600)
    return folder / "node.pem", folder / "node.key"


def openssl_dates(certificate: Path) -> tuple[datetime, datetime]:
    said = subprocess.run(
        [require_tool("openssl"), "x509", "-in", str(certificate), "-noout", "-startdate", "-enddate"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    dates = dict(line.split("=", 1) for line in said.splitlines())

    def utc(key: str) -> datetime:
        return datetime.strptime(dates[key], "%b %d %H:%M:%S %Y GMT").replace(tzinfo=timezone.utc)

    return utc("notBefore"), utc("notAfter")


def serve_with(tmp_path: Path, certificate: Path, key: Path) -> subprocess.CompletedProcess[str]:
    tls = {"certificate": str(certificate), "private_key": str(key)}
    return run("serve", config=write_config(tmp_path, {**NODE, "network": {"port": free_port(), "tls": tls}}))


def test_the_certificate_lifetime_is_read_as_openssl_reads_it(tmp_path, certificates):
    version_1 = certificate_valid(tmp_path / "v1", "20300101000000Z", "20510101000000Z")[0]  # no version field

    for certificate in (certificates.node, certificates.ca, version_1):
        assert certificate_lifetime(certificate) == openssl_dates(certificate)
    assert certificate_lifetime(certificates.node_key) is None  # no certificate in it


def test_serve_refuses_an_expired_certificate_naming_the_key_the_file_and_the_date(tmp_path):
    certificate, key = certificate_valid(tmp_path / "pki", "20200101000000Z", "20210101000000Z")

    result = serve_with(tmp_path, certificate, key)

    assert_says(
        result,
        f"cannot start: network.tls.certificate {certificate} expired on 2021-01-01 00:00 UTC: every caller would "
        "refuse it during the TLS handshake; install a renewed certificate and start again",
        code=1,  # systemd tries again, so a certificate renewed by automation is taken up without anyone
    )


def test_serve_refuses_a_certificate_not_valid_yet(tmp_path):
    certificate, key = certificate_valid(tmp_path / "pki", "20491231000000Z", "20510101000000Z")

    result = serve_with(tmp_path, certificate, key)

    assert_says(
        result,
        f"cannot start: network.tls.certificate {certificate} is not valid before 2049-12-31 00:00 UTC",
        code=1,  # a clock behind at boot is right once synchronised: systemd's next try starts
    )
    assert "check this machine's clock" in result.stderr


def tls_settings(tmp_path: Path, certificate: Path, key: Path) -> Settings:
    tls = {"certificate": str(certificate), "private_key": str(key)}
    return load_settings(write_config(tmp_path, {"network": {"tls": tls}}))


def test_a_certificate_that_expires_within_30_days_and_a_key_others_may_read_are_warned_about_at_start(
    tmp_path, certificates: Certificates, caplog
):
    key = tmp_path / "node.key"  # the session's certificates expire in two days
    key.write_bytes(certificates.node_key.read_bytes())
    key.chmod(0o644)
    settings = tls_settings(tmp_path, certificates.node, key)
    lifetime = certificate_lifetime(certificates.node)
    assert lifetime is not None

    with caplog.at_level(logging.WARNING, logger="dicom_node.security"):
        security.apply(settings)  # what start-up does first

    warned = {record.getMessage(): getattr(record, "event_fields", {}) for record in caplog.records}
    soon, readable = warned["tls.certificate_expires_soon"], warned["tls.private_key_readable"]
    expires = lifetime[1].strftime("%Y-%m-%d %H:%M UTC")
    assert (soon["key"], soon["file"], soon["expires"]) == ("network.tls.certificate", str(certificates.node), expires)
    assert f"network.tls.certificate {certificates.node} expires on {expires} (in 1 day(s))" in soon["hint"]
    assert f"network.tls.private_key {key} may be read by every user of this machine" in readable["hint"]
    assert f"chmod 600 {key}" in readable["hint"]


def test_a_running_node_warns_again_about_the_certificate_it_presents_and_says_when_it_has_expired(
    tmp_path, certificates: Certificates, caplog
):
    settings = tls_settings(tmp_path, certificates.node, certificates.node_key)
    lifetime = certificate_lifetime(certificates.node)
    assert lifetime is not None
    expires = lifetime[1].strftime("%Y-%m-%d %H:%M UTC")
    watch = security.CertificateWatch(settings, sessions=None)  # type: ignore[arg-type]  # it reads no database

    with caplog.at_level(logging.WARNING, logger="dicom_node.security"):
        watch.run_once()  # the pass at start: start-up has warned already
        assert caplog.records == []
        watch.check(lifetime[1] - timedelta(days=1, hours=1))
        watch.check(lifetime[1] + timedelta(minutes=1))

    (soon, expired) = caplog.records
    assert (soon.levelname, soon.getMessage()) == ("WARNING", "tls.certificate_expires_soon")
    assert soon.event_fields["hint"].startswith(
        f"network.tls.certificate {certificates.node}, which the node presents since it started, expires on {expires} "
        "(in 1 day(s))"
    )
    assert (expired.levelname, expired.getMessage()) == ("ERROR", "tls.certificate_expired")
    assert expired.event_fields["hint"] == (
        f"network.tls.certificate {certificates.node}, which the node presents since it started, expired on {expires}: "
        "every TLS caller refuses it now; install a renewed certificate and restart the node"
    )


def test_a_running_node_says_nothing_of_a_long_lived_certificate(tmp_path, caplog):
    certificate, key = certificate_valid(tmp_path / "pki", "20200101000000Z", "20510101000000Z")
    watch = security.CertificateWatch(tls_settings(tmp_path, certificate, key), sessions=None)  # type: ignore[arg-type]

    with caplog.at_level(logging.WARNING, logger="dicom_node.security"):
        watch.check(datetime(2049, 6, 1, tzinfo=timezone.utc))

    assert caplog.records == []


def test_a_long_lived_certificate_and_a_private_key_are_not_warned_about(tmp_path):
    certificate, key = certificate_valid(tmp_path / "pki", "20200101000000Z", "20510101000000Z")
    settings = tls_settings(tmp_path, certificate, key)

    assert tls_file_warnings(settings) == []


def test_the_console_certificate_is_checked_too(tmp_path, certificates: Certificates):
    key = tmp_path / "console.key"
    key.write_bytes(certificates.node_key.read_bytes())
    key.chmod(0o640)
    console = {"enabled": True, "tls_certificate": str(certificates.node), "tls_private_key": str(key)}
    settings = load_settings(write_config(tmp_path, {"console": console}))

    warnings = dict(tls_file_warnings(settings))

    assert warnings["tls.certificate_expires_soon"]["key"] == "console.tls_certificate"
    assert warnings["tls.private_key_readable"]["key"] == "console.tls_private_key"
    assert "may be read by the members of its group" in warnings["tls.private_key_readable"]["hint"]


def test_relative_tls_paths_are_relative_to_the_config_file_not_the_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    config = folder / "config.yaml"
    tls = {"certificate": "tls/node.pem", "private_key": "tls/node.key", "ca_certificates": "tls/ca.pem"}
    console = {"tls_certificate": "tls/web.pem", "tls_private_key": "/abs/web.key"}
    config.write_text(yaml.safe_dump({"network": {"tls": tls}, "console": console}))
    monkeypatch.chdir("/")  # as systemd starts the node

    settings = load_settings(config)

    assert settings.network.tls is not None
    assert settings.network.tls.certificate == folder / "tls" / "node.pem"
    assert settings.network.tls.private_key == folder / "tls" / "node.key"
    assert settings.network.tls.ca_certificates == folder / "tls" / "ca.pem"
    assert settings.console.tls_certificate == folder / "tls" / "web.pem"
    assert settings.console.tls_private_key == Path("/abs/web.key")


@pytest.mark.parametrize("where", ["file", "environment"])
def test_serve_under_systemd_finds_tls_files_beside_the_config_file(tmp_path, where):
    certificate, _key = certificate_valid(tmp_path / "etc" / "tls", "20200101000000Z", "20210101000000Z")
    tls = {"certificate": "tls/node.pem", "private_key": "tls/node.key"}
    network = {"port": free_port(), **({"tls": tls} if where == "file" else {})}
    config = write_config(tmp_path / "etc", {**NODE, "network": network})
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    if where == "environment":
        environment["DICOM_NODE_NETWORK__TLS"] = json.dumps(tls)

    result = subprocess.run(
        [DICOM_NODE, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",  # as systemd starts it
        env=environment,
    )

    # The file is found and read (its date is checked), where it "did not exist" in the working directory.
    assert_says(result, f"cannot start: network.tls.certificate {certificate} expired on 2021-01-01 00:00 UTC")
