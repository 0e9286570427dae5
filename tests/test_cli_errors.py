"""Every CLI failure is one sentence naming the file, setting, host or port: no traceback, no exception class."""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import socket
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import DICOM_NODE

INTERNALS = re.compile(
    r"Traceback|\b[A-Z]\w*(Error|Exception|Warning)\b|\[Errno|sqlalche\.me|<class |instance of |EnvSettingsSource"
    r"|\[SQL|\\x[0-9a-f]{2}-"
)
"""What no message may show: a traceback, an exception class, errno prefixes, library URLs, SQL, pydantic terms."""


def run(*args: str, config: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [DICOM_NODE, *args, *(["--config", str(config)] if config else [])]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")} | (env or {})
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)


def assert_says(result: subprocess.CompletedProcess[str], sentence: str, *, code: int | None = None) -> None:
    """The command failed, said ``sentence``, and showed nothing of Python's internals."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    if code is not None:
        assert result.returncode == code, output
    assert sentence in " ".join(result.stderr.split()), output
    assert INTERNALS.search(output) is None, output


def write_config(folder: Path, data: dict, name: str = "config.yaml") -> Path:
    data = {"storage": {"directory": str(folder / "storage")}, **data}
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


NODE = {"network": {"port": 0}, "inference": {"workers": 0}, "receive": {"processes": 1}}
"""Settings under which `serve` starts nothing heavy (each test sets the port it needs)."""


def node_config(folder: Path, **extra: object) -> Path:
    return write_config(folder, {**NODE, "network": {"port": free_port()}, **extra})


@pytest.fixture
def runner(monkeypatch):
    """The CLI in this process (for failures that cannot be made for real: a read-only disk, no network)."""
    umask = os.umask(0o022)
    os.umask(umask)
    monkeypatch.setattr("dicom_node.cli.configure_logging", lambda *_args: None)
    yield CliRunner()
    os.umask(umask)  # every command makes new files private; the other tests' files keep this process' umask


def invoke(runner: CliRunner, *args: str) -> subprocess.CompletedProcess[str]:
    from dicom_node.cli import app

    result = runner.invoke(app, list(args))
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


# 1. The database: damaged, unreachable, not a URL, a driver that is not installed, a read-only disk.


@pytest.mark.parametrize(
    "command", [["status"], ["show", "1.2.3"], ["rejected"], ["audit"], ["retry", "1.2.3"], ["serve"]]
)
def test_a_damaged_sqlite_file_is_named(tmp_path, command):
    config = node_config(tmp_path)
    (tmp_path / "storage").mkdir()
    database = tmp_path / "storage" / "dicom-node.db"
    database.write_bytes(os.urandom(4096))

    result = run(*command, config=config)

    assert_says(result, f"the database file {database} is not an SQLite database (damaged, or another kind of file)")


@pytest.mark.parametrize("command", [["status"], ["retry", "1.2.3"], ["serve"]])
def test_an_unreachable_postgresql_is_named_by_host_and_port_without_its_password(tmp_path, command):
    port = free_port()
    config = node_config(tmp_path, database={"url": f"postgresql+psycopg://u:secretpw@127.0.0.1:{port}/x"})

    result = run(*command, config=config)

    assert_says(result, f"cannot reach the database at 127.0.0.1:{port} (connection refused", code=1)
    assert "secretpw" not in result.stdout + result.stderr


@pytest.mark.parametrize("command", [["config", "check"], ["status"], ["retry", "1"], ["worker"], ["serve"]])
def test_a_database_url_that_is_not_a_url(tmp_path, command):
    config = node_config(tmp_path, database={"url": "not a url at all"})

    result = run(*command, config=config)

    assert_says(
        result,
        "database.url 'not a url at all' is not a database URL (for example postgresql+psycopg://user@host/db)",
        code=2,  # a configuration error for every command, so systemd does not restart a worker in a loop
    )


@pytest.mark.parametrize("command", [["config", "check"], ["serve"]])
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite://", "database.url is an in-memory SQLite database"),
        ("sqlite:///:memory:", "database.url is an in-memory SQLite database"),
        ("sqlite://data/x.db", "database.url is not a SQLite URL the node can use: it names a host (data) where"),
    ],
)
def test_a_sqlite_url_that_names_no_file_is_a_configuration_error(tmp_path, command, url, expected):
    config = node_config(tmp_path, database={"url": url})

    result = run(*command, config=config)

    assert_says(result, expected, code=2)
    assert "[YAML key database.url or env DICOM_NODE_DATABASE__URL]" in result.stderr
    assert not (tmp_path / "storage" / ".database").exists()


@pytest.mark.parametrize("command", [["config", "check"], ["status"], ["retry", "1"], ["worker"], ["serve"]])
def test_a_database_driver_that_is_not_installed(tmp_path, command):
    if importlib.util.find_spec("MySQLdb") is not None:
        pytest.skip("MySQLdb is installed here")
    config = node_config(tmp_path, database={"url": "mysql://u:secretpw@127.0.0.1:1/x"})

    result = run(*command, config=config)

    assert_says(result, "the database driver MySQLdb for mysql URLs is not installed", code=2)
    assert "secretpw" not in result.stdout + result.stderr


def test_a_database_on_a_read_only_file_system(tmp_path, runner, monkeypatch):
    from sqlalchemy.exc import OperationalError

    config = node_config(tmp_path)

    def read_only(*_args: object) -> None:
        raise OperationalError("PRAGMA journal_mode=WAL", {}, sqlite3.OperationalError("unable to open database file"))

    (tmp_path / "storage").mkdir()
    monkeypatch.setattr("dicom_node.service.db_session.open_database", read_only)
    monkeypatch.setattr("dicom_node.service._read_only_file_system", lambda _folder: True)

    result = invoke(runner, "serve", "--config", str(config))

    storage = tmp_path / "storage"
    assert_says(
        result, f"cannot open the database file {storage / 'dicom-node.db'}: {storage} is on a read-only file system"
    )


def test_storage_on_a_read_only_file_system(tmp_path, runner, monkeypatch):
    config = node_config(tmp_path)
    instances = tmp_path / "storage" / "instances"

    def read_only(_settings: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(instances))

    monkeypatch.setattr("dicom_node.service.serve", read_only)

    result = invoke(runner, "serve", "--config", str(config))

    assert_says(result, f"cannot start: {instances} is on a read-only file system")


# 2. Config files that are no text, or no file.


def test_a_config_file_that_is_not_utf8(tmp_path):
    config = tmp_path / "bin.yaml"
    config.write_bytes(b"\xff\xfe\x00bad")

    result = run("config", "check", config=config)

    assert_says(result, f"config file {config} is not a UTF-8 text file", code=2)


def test_a_folder_given_as_config_file(tmp_path):
    result = run("config", "check", config=tmp_path)

    assert_says(result, f"config file {tmp_path} is a folder, not a YAML file", code=2)


# 3. Validation errors in words.


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"storage": {"directory": 5}}, "storage.directory must be a folder path (got 5)"),
        ({"network": 5}, "network must be a section of settings (got 5)"),
        (
            {"network": {"ae_title": "A\\B"}},
            "network.ae_title may hold only printable ASCII characters other than backslash, at most 16",
        ),
        (
            {"network": {"tls": {"certificate": 5, "private_key": "k.pem"}}},
            "network.tls.certificate must be a file path",
        ),
        ({"rules": 5}, "rules must be a list (got 5)"),
        ({"models": {"m": {}}}, "models.m needs a kind key that says which kind it is"),
        (
            {"rules": [{"name": "a", "action": "ignore", "destinations": ["nowhere"]}]},
            "rules[0] (a): unknown destination 'nowhere'",
        ),
    ],
)
def test_configuration_errors_are_said_in_words(tmp_path, data, expected):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))

    result = run("config", "check", config=config)

    assert_says(result, expected, code=2)
    assert "pattern" not in result.stderr and "(top level)" not in result.stderr
    assert "env DICOM_NODE_ " not in result.stderr and "env DICOM_NODE_]" not in result.stderr


def test_an_environment_value_that_is_not_json(tmp_path):
    config = write_config(tmp_path, {})

    result = run("config", "check", config=config, env={"DICOM_NODE_RULES": "[{"})

    assert_says(result, "the environment variable DICOM_NODE_RULES is not valid JSON", code=2)


SECRETS = {
    "database": {"url": "postgresql+psycopg://u:se@cret-pw@127.0.0.1:1/x?sslpassword=key-pw&application_name=n"},
    "console": {
        "session_secret": "cookie-key-0123456789-0123456789-x",
        "metrics_token": "metrics-tok",
        "users": {"olga": {"password_hash": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA", "role": "operator"}},
    },
}


def test_config_show_hides_secrets_unless_asked(tmp_path, runner):
    config = write_config(tmp_path, SECRETS)

    shown = invoke(runner, "config", "show", "--config", str(config))
    everything = invoke(runner, "config", "show", "--show-secrets", "--config", str(config))

    assert shown.returncode == 0 and everything.returncode == 0
    for secret in ("cret-pw", "key-pw", "cookie-key", "metrics-tok", "aGFzaA"):
        assert secret not in shown.stdout
        assert secret in everything.stdout
    visible = yaml.safe_load(shown.stdout)
    assert visible["database"]["url"] == "postgresql+psycopg://u:***@127.0.0.1:1/x?sslpassword=***&application_name=n"
    assert visible["console"]["users"]["olga"] == {"password_hash": "(hidden)", "role": "operator"}


def test_config_check_names_a_wrong_secret_without_its_value(tmp_path):
    config = write_config(tmp_path, {"console": {"session_secret": "hunter2-secret"}})

    result = run("config", "check", config=config)

    assert_says(result, "console.session_secret: String should have at least 32 characters", code=2)
    assert "hunter2-secret" not in result.stdout + result.stderr


def test_config_check_names_an_unknown_environment_variable(tmp_path):
    config = write_config(tmp_path, {})

    result = run("config", "check", config=config, env={"DICOM_NODE_RETENTION_DAYS": "1"})

    assert_says(
        result, "unknown environment variable DICOM_NODE_RETENTION_DAYS (did you mean DICOM_NODE_RETENTION__DAYS?)"
    )


# 4. Storage that is a file.


def test_serve_with_storage_that_is_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    config = write_config(tmp_path, {**NODE, "network": {"port": free_port()}, "storage": {"directory": str(afile)}})

    result = run("serve", config=config)

    assert_says(result, f"cannot start: storage.directory {afile} is a file, not a folder", code=2)


# 5. Weights: a file that is no zip; no network.


def test_weights_import_of_a_file_that_is_not_a_zip(tmp_path):
    config = write_config(tmp_path, {})
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(os.urandom(1000))

    result = run("weights", "import", str(garbage), config=config)

    assert_says(result, f"import failed: {garbage} is not a zip file, or it is damaged", code=1)


def test_weights_download_without_network(tmp_path, runner, monkeypatch):
    import requests
    from urllib3 import HTTPSConnectionPool
    from urllib3.connection import HTTPSConnection
    from urllib3.exceptions import MaxRetryError, NameResolutionError

    config = write_config(tmp_path, {})
    unresolved = NameResolutionError(
        "github.com", HTTPSConnection("github.com", 443), socket.gaierror(-2, "Name or service not known")
    )
    offline = requests.exceptions.ConnectionError(
        MaxRetryError(HTTPSConnectionPool("github.com", 443), "/wasserth/TotalSegmentator/x.zip", unresolved)
    )

    def download(_task: str, _folder: Path) -> list[Path]:
        raise offline

    monkeypatch.setattr("inference.weights.download", download)

    result = invoke(runner, "weights", "download", "--config", str(config))

    assert_says(
        result,
        "cannot download the weights from github.com: the host name cannot be resolved (no network?); "
        "on an offline machine use `dicom-node weights import`",
        code=1,
    )
    assert "HTTPSConnectionPool" not in result.stderr and "Max retries" not in result.stderr


# 6. echo: a host that does not resolve, a port that is none.


def test_echo_a_host_that_does_not_resolve(tmp_path):
    config = write_config(
        tmp_path, {"destinations": {"pacs": {"ae_title": "PACS", "host": "no-such-host.invalid", "port": 104}}}
    )

    result = run("echo", "pacs", "--timeout", "5", config=config)

    assert_says(result, "no-such-host.invalid", code=1)
    assert "cannot be resolved" in result.stderr


def test_echo_a_port_out_of_range(tmp_path):
    config = write_config(tmp_path, {})

    result = run("echo", "--host", "127.0.0.1", "--port", "70000", "--ae-title", "PACS", config=config)

    assert_says(result, "--port 70000 is not a port number (1 to 65535)", code=2)


def test_echo_a_destination_whose_host_is_empty_names_the_setting(tmp_path):
    config = write_config(tmp_path, {"destinations": {"pacs": {"ae_title": "PACS", "host": "pacs.local", "port": 104}}})

    result = run("echo", "pacs", config=config, env={"DICOM_NODE_DESTINATIONS__PACS__HOST": ""})

    assert_says(result, "destinations.pacs.host must not be empty", code=2)
    assert "DICOM_NODE_DESTINATIONS__PACS__HOST" in result.stderr
    assert "give a destination name" not in result.stderr


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--host", "", "--port", "104", "--ae-title", "PACS"], "--host must not be empty"),
        (["--host", "0.0.0.0", "--port", "104", "--ae-title", "PACS"], "--host '0.0.0.0' is no address to call"),
        (["--host", "pacs:104", "--ae-title", "PACS"], "--host 'pacs:104' looks like host:port: give the host alone"),
        (["--host", "pacs", "--ae-title", "PACS"], "give a destination name, or --host, --port and --ae-title (--port"),
    ],
)
def test_echo_options_that_name_no_peer_say_which(tmp_path, options, expected):
    result = run("echo", *options, config=write_config(tmp_path, {}))

    assert_says(result, expected, code=2)


# 7. What peers sent is escaped.

EVIL_DESCRIPTION = "\x1b[2J wiped\nfake row"
EVIL_SOP = "1.2.3.\x1b[31mX"


def _database_with_peer_text(tmp_path: Path) -> tuple[Path, str]:
    from db.models import Job, JobState, RejectedInstance, Series, Study
    from db.session import transaction
    from dicom_node.config import load_settings
    from dicom_node.service import open_database

    config = write_config(tmp_path, {})
    sessions = open_database(load_settings(config))
    uid = "1.2.826.0.1.3680043.8.498.1"
    with transaction(sessions) as session:
        study = Study(study_instance_uid="1.2.826.0.1.3680043.8.498.2")
        series = Series(
            series_instance_uid=uid, study=study, modality="CT", series_description=EVIL_DESCRIPTION, instance_count=1
        )
        session.add_all(
            [study, series, Job(series=series, state=JobState.IGNORED, reason="[bold]markup[/] :cross_mark: \x07")]
        )
        session.add(RejectedInstance(sop_instance_uid=EVIL_SOP, status=0xC000, reason="refused \x1b]0;title\x07"))
    sessions.kw["bind"].dispose()
    return config, uid


def test_status_show_and_rejected_escape_what_peers_sent(tmp_path):
    config, uid = _database_with_peer_text(tmp_path)

    outputs = {command[0]: run(*command, config=config) for command in (["status"], ["show", uid], ["rejected"])}

    for command, result in outputs.items():
        assert result.returncode == 0, result.stderr
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout, command
        assert INTERNALS.search(result.stdout + result.stderr) is None, result.stdout
    assert "'?[2J wiped?fake row'" in outputs["status"].stdout
    assert not any("fake row" in line and "wiped" not in line for line in outputs["status"].stdout.splitlines())
    for command in ("status", "show"):
        assert "[bold]markup[/] :cross_mark:" in outputs[command].stdout  # as it is: no markup, no emoji
    assert "'1.2.3.?[31mX'" in outputs["rejected"].stdout


# 8. phantom under a file; a port in use; a TLS certificate that is missing.


def test_phantom_to_a_path_under_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")

    result = run("phantom", str(afile / "ct"), "--slices", "2", "--size", "16")

    assert_says(result, f"cannot write phantom: {afile} is a file, where a folder is needed", code=1)


def test_serve_on_a_port_in_use(tmp_path):
    with closing(socket.socket()) as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        config = write_config(tmp_path, {**NODE, "network": {"port": port}})

        result = run("serve", config=config)

    assert_says(result, f"cannot start: port {port} is already in use by another program", code=1)


def test_serve_with_a_missing_tls_certificate(tmp_path):
    certificate, key = tmp_path / "missing.pem", tmp_path / "missing.key"
    config = write_config(
        tmp_path,
        {**NODE, "network": {"port": free_port(), "tls": {"certificate": str(certificate), "private_key": str(key)}}},
    )

    result = run("serve", config=config)

    assert_says(result, f"cannot start: network.tls.certificate {certificate} does not exist", code=2)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("no-such-host.invalid", "network.host 'no-such-host.invalid' cannot be resolved to an address"),
        ("192.0.2.55", "network.host '192.0.2.55' is not an address of this machine"),
    ],
)
def test_serve_on_an_address_it_cannot_listen_on_names_network_host(tmp_path, host, expected):
    config = write_config(tmp_path, {**NODE, "network": {"host": host, "port": free_port()}})

    result = run("serve", config=config)

    assert_says(result, f"cannot start: {expected}", code=1)


# 9. Exit 2 where starting again cannot help (systemd: RestartPreventExitStatus=2), 1 where it may.


def test_serve_on_a_database_of_a_newer_version_exits_2(start_node, tmp_path):
    node = start_node()
    node.stop()
    database = node.storage / "dicom-node.db"
    with closing(sqlite3.connect(database)) as connection, connection:
        connection.execute("UPDATE alembic_version SET version_num = '0099'")

    result = run("serve", config=node.config_path)

    assert_says(
        result,
        f"cannot start: the database file {database} was written by a newer version of dicom-node (its schema "
        "revision 0099 is unknown to this version)",
        code=2,
    )


def test_serve_refused_a_port_below_1024_exits_2(tmp_path, runner, monkeypatch):
    config = write_config(tmp_path, {**NODE, "network": {"port": 104}})

    def refused(_settings: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("dicom_node.service.serve", refused)

    result = invoke(runner, "serve", "--config", str(config))

    assert_says(
        result,
        "cannot start: the node's user may not listen on port 104 (ports below 1024 need administrator rights)",
        code=2,
    )


def test_serve_on_a_storage_file_it_may_not_write_exits_1(tmp_path, runner, monkeypatch):
    """A file's permissions can be put right while a supervisor keeps trying: the next start then works."""
    config = node_config(tmp_path)
    instances = tmp_path / "storage" / "instances"

    def refused(_settings: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(instances))

    monkeypatch.setattr("dicom_node.service.serve", refused)

    result = invoke(runner, "serve", "--config", str(config))

    assert_says(result, f"cannot start: the node's user may not use {instances} (permission denied)", code=1)


@pytest.mark.parametrize(
    ("arguments", "option"),
    [
        (["status", "--limit", "-3"], "--limit"),
        (["rejected", "--limit", "0"], "--limit"),
        (["audit", "--hours", "-1"], "--hours"),
    ],
)
def test_a_negative_count_or_time_span_is_refused_naming_the_option(runner, arguments, option):
    """`status --limit -3` showed every series, `audit --hours -1` an empty table without a word."""
    result = invoke(runner, *arguments)

    assert result.returncode == 2
    assert f"Invalid value for '{option}'" in result.stdout + result.stderr
