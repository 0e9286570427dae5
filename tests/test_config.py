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
            {"rules": [{"name": "x", "action": "ignore", "match": {"series_description": "(?i)abd(?!omen)"}}]},
            "rules.0.match.series_description: not a valid regular expression for routing (invalid perl operator: "
            "(?!): rules are matched by RE2, which is never slow whatever a peer sends but has no look-around",
        ),
        (
            {"rules": [{"name": "x", "action": "ignore", "match": {"slice_thickness": {"min": 5, "max": 1}}}]},
            "min (5.0) is greater than max",
        ),
        (
            {"network": {"tls": {"certificate": "c.pem", "private_key": "k.pem", "require_client_certificate": True}}},
            "require_client_certificate needs ca_certificates",
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


def test_a_destinations_block_added_above_the_shipped_one_is_refused_naming_both_lines(tmp_path):
    site = "destinations:\n  pacs: {ae_title: HOSPPACS, host: 10.1.2.3, port: 104}\n\n"
    path = tmp_path / "config.yaml"
    path.write_text(site + (ROOT / "config.yaml").read_text())
    shipped_line = 3 + (ROOT / "config.yaml").read_text().splitlines().index("destinations:") + 1

    with pytest.raises(ConfigError) as error:
        load_settings(path)

    assert str(error.value).splitlines() == [
        f"{path}: 1 key(s) given twice",
        f"  destinations is given twice, on lines 1 and {shipped_line}: YAML would keep only the later one and drop "
        "the other without a word; merge them into one  [YAML key destinations or env DICOM_NODE_DESTINATIONS]",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "destinations:\n  pacs:\n    ae_title: PACS\n    host: 10.0.0.5\n    port: 104\n    send: [seg, sr]\n"
            "    send: [seg]\n",
            "destinations.pacs.send is given twice, on lines 6 and 7",
        ),
        (
            "rules:\n  - name: ct\n    action: ignore\n    match: {modality: CT}\n    match: {modality: MR}\n",
            "rules.0.match is given twice, on lines 4 and 5: YAML would keep only the later one and drop the other "
            "without a word; merge them into one  [YAML key rules.0.match or env DICOM_NODE_RULES]",
        ),
        (
            "peers:\n  pacs: {hosts: [10.0.0.1]}\nnetwork: {port: 104}\npeers:\n  ct: {hosts: [10.0.0.2]}\n",
            "peers is given twice, on lines 1 and 4",
        ),
    ],
)
def test_a_key_given_twice_in_one_mapping_is_refused(tmp_path, text, expected):
    path = tmp_path / "config.yaml"
    path.write_text(text)

    with pytest.raises(ConfigError) as error:
        load_settings(path)

    assert expected in str(error.value)


def test_a_key_a_yaml_merge_overrides_is_no_repetition(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "destinations:\n  pacs: &pacs {ae_title: PACS, host: 10.0.0.5, port: 104}\n"
        "  archive:\n    <<: *pacs\n    ae_title: ARCHIVE\n    port: 105\n"
    )

    settings = load_settings(path)

    assert (settings.destinations["archive"].ae_title, settings.destinations["archive"].port) == ("ARCHIVE", 105)


def refusal(tmp_path: Path, data: dict) -> str:
    """The message ``load_settings`` refuses ``data`` with."""
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, data))
    return " ".join(str(error.value).split())


PACS = {"ae_title": "PACS", "host": "10.0.0.1", "port": 104}


@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0", "10.0.0.0/8", "2001:db8::/32"])
def test_a_trusted_proxy_network_wider_than_a_small_network_is_refused(tmp_path, network):
    message = refusal(tmp_path, {"console": {"auth": "proxy_header", "trusted_proxies": [network]}})
    assert f"console.trusted_proxies: '{network}' is too wide for a proxy" in message
    assert "DICOM_NODE_CONSOLE__TRUSTED_PROXIES" in message


def test_a_small_trusted_proxy_network_is_accepted(tmp_path):
    settings = load_settings(write(tmp_path, {"console": {"trusted_proxies": ["10.1.0.0/16", "2001:db8:1::/48"]}}))
    assert settings.console.trusted_proxies == ["10.1.0.0/16", "2001:db8:1::/48"]


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        ({**PACS, "ae_title": "DICOMNODE"}, "destinations.self.ae_title DICOMNODE is the node's own AE title"),
        ({**PACS, "host": "localhost", "port": 11112}, "destinations.self (localhost:11112) is the node itself"),
        ({**PACS, "host": "127.0.0.2", "port": 11112}, "destinations.self (127.0.0.2:11112) is the node itself"),
    ],
)
def test_a_destination_that_is_the_node_itself_is_refused(tmp_path, destination, expected):
    assert expected in refusal(tmp_path, {"destinations": {"self": destination}})


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("", "destinations.pacs.host must not be empty: give a host name or IP address"),
        ("   ", "destinations.pacs.host must not be empty"),
        ("pacs host", "destinations.pacs.host: 'pacs host' holds a space: a host name or IP address has none"),
        ("pacs.example.org:104", "'pacs.example.org:104' looks like host:port: give the host alone here, and the port"),
        ("[2001:db8::1]:104", "'[2001:db8::1]:104' looks like host:port"),
        ("dicom://pacs", "'dicom://pacs' is not a host name or IP address"),
        ("0.0.0.0", "'0.0.0.0' is no address to call: it means every address of this machine when listening"),
        ("::", "'::' is no address to call"),
        ("0", "'0' is no address to call"),
    ],
)
def test_a_destination_host_that_is_no_address_to_call_is_refused(tmp_path, host, expected):
    message = refusal(tmp_path, {"destinations": {"pacs": {**PACS, "host": host}}})
    assert expected in message
    assert "[YAML key destinations.pacs.host or env DICOM_NODE_DESTINATIONS__PACS__HOST]" in message


def test_an_empty_destination_host_from_the_environment_is_refused(tmp_path, monkeypatch):
    """docker-compose gives ``${PACS_HOST}`` of an unset variable as an empty value: results went to whatever
    listened on this machine at that port."""
    monkeypatch.setenv("DICOM_NODE_DESTINATIONS__PACS__HOST", "")
    message = refusal(tmp_path, {"destinations": {"pacs": PACS}})
    assert "destinations.pacs.host must not be empty" in message
    assert "DICOM_NODE_DESTINATIONS__PACS__HOST" in message


def test_a_peer_move_address_that_is_no_address_to_call_is_refused(tmp_path):
    peer = {"ae_title": "WS", "hosts": ["10.0.0.2"], "roles": ["move"], "host": "0.0.0.0", "port": 104}
    message = refusal(tmp_path, {"peers": {"ws": peer}})
    assert "peers.ws.host: '0.0.0.0' is no address to call" in message


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("", "network.host must not be empty"),
        ("0.0.0.0:11112", "network.host: '0.0.0.0:11112' looks like host:port"),
        ("127.0.0.1 10.0.0.1", "network.host: '127.0.0.1 10.0.0.1' holds a space"),
    ],
)
def test_a_listening_address_that_is_none_is_refused(tmp_path, host, expected):
    assert expected in refusal(tmp_path, {"network": {"host": host}})


def test_host_settings_are_read_without_surrounding_spaces_and_every_address_may_be_listened_on(tmp_path):
    settings = load_settings(
        write(
            tmp_path,
            {
                "network": {"host": "127.0.0.1 "},
                "console": {"host": "::", "metrics_host": " 0.0.0.0"},
                "destinations": {"pacs": {**PACS, "host": " pacs.example.org "}},
            },
        )
    )
    assert settings.network.host == "127.0.0.1"
    assert (settings.console.host, settings.console.metrics_host) == ("::", "0.0.0.0")
    assert settings.destinations["pacs"].host == "pacs.example.org"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "::ffff:127.0.0.1", "127.1", "localhost", "10.0.0.7"])
def test_the_self_destination_check_counts_every_way_of_naming_this_machine(host):
    from dicom_node.config import _is_this_host

    assert _is_this_host(host, own_host="10.0.0.7")
    assert not _is_this_host("10.0.0.8", own_host="10.0.0.7")


def test_one_ae_title_has_one_address_for_c_move(tmp_path):
    two = {"a": PACS, "b": {**PACS, "ae_title": " PACS", "host": "10.9.9.9"}}
    assert "destinations.a and destinations.b both have the AE title PACS but different addresses" in refusal(
        tmp_path, {"destinations": two}
    )
    peer = {"ae_title": "PACS", "hosts": ["10.0.0.2"], "roles": ["move"], "host": "10.6.6.6", "port": 104}
    assert "peers.p and destinations.a both have the AE title PACS" in refusal(
        tmp_path, {"destinations": {"a": PACS}, "peers": {"p": peer}}
    )
    same = {**peer, "host": "10.0.0.1"}  # the same device, listed as both: fine
    assert load_settings(write(tmp_path, {"destinations": {"a": PACS}, "peers": {"p": same}})).peers["p"].host


def test_a_peer_address_with_bits_past_its_prefix_is_refused(tmp_path):
    message = refusal(tmp_path, {"peers": {"ct": {"hosts": ["10.1.2.3/8"]}}})
    assert "peers.ct.hosts: '10.1.2.3/8' has an address with bits set past its /8 prefix" in message
    assert "write 10.1.2.3/32 for that one host, or 10.0.0.0/8 for the network" in message


def test_a_peer_admitting_every_address_to_read_data_is_warned_about(tmp_path):
    from dicom_node.config import open_peer_warnings

    peers = {
        "anyone": {"hosts": ["0.0.0.0/0", "::/0"], "roles": ["store", "find", "move"]},
        "senders": {"hosts": ["0.0.0.0/0"], "roles": ["store", "echo"]},
        "planner": {"ae_title": "PLANNER", "hosts": ["10.1.5.0/24"], "roles": ["find", "get"]},
    }
    settings = load_settings(write(tmp_path, {"peers": peers}))

    assert open_peer_warnings(settings) == [
        "peers.anyone admits any AE title from every address (0.0.0.0/0, ::/0) with the roles find, move: anyone "
        "who can reach the port can read patient data; list the hosts it calls from in peers.anyone.hosts"
    ]


@pytest.mark.parametrize(
    ("data", "secret"),
    [
        ({"console": {"session_secret": "hunter2-secret"}}, "hunter2-secret"),
        ({"console": {"metrics_token": 987654321}}, "987654321"),
        ({"console": {"users": {"olga": {"password_hash": "PlainTextPassw0rd"}}}}, "PlainTextPassw0rd"),
        ({"console": {"users": {"olga": "$argon2id$v=19$secrethash"}}}, "secrethash"),
        ({"database": {"url": ["postgresql://u:pw-secret@db/x"]}}, "pw-secret"),
    ],
)
def test_a_message_never_shows_a_secret(tmp_path, data, secret):
    message = refusal(tmp_path, data)
    assert "its value is not shown: it is a secret" in message
    assert secret not in message


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://u:se@cret@db.example:5432/x", "postgresql://u:***@db.example:5432/x"),
        ("'postgresql://u:pw@db'", "'postgresql://u:***@db'"),
        (
            "cannot use postgresql://node:Zk9/q+Lr2s8TbP@db:5432/node: refused",
            "cannot use postgresql://node:***@db:5432/node: refused",
        ),
        (
            "postgresql://u@db/x?password=pw&sslpassword=key&application_name=n",
            "postgresql://u@db/x?password=***&sslpassword=***&application_name=n",
        ),
    ],
)
def test_hide_password_hides_passwords_with_at_signs_and_in_the_query(text, shown):
    from dicom_node.config import hide_password

    assert hide_password(text) == shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql+psycopg://node:Zk9/q+Lr2s8TbP@127.0.0.1:5432/node",
            "postgresql+psycopg://node:***@127.0.0.1:5432/node",
        ),
        ("postgresql://node:two words/and@more@db/node?sslpassword=k", "postgresql://node:***@db/node?sslpassword=***"),
        ("postgresql://node@db/node", "postgresql://node@db/node"),
        ("sqlite:////var/lib/dicom-node/dicom-node.db", "sqlite:////var/lib/dicom-node/dicom-node.db"),
    ],
)
def test_a_database_url_shown_hides_a_password_holding_slashes_spaces_and_at_signs(url, shown):
    """A viewer read `Zk9/q+Lr2s8TbP` on the console's configuration page: the password ran past a '/'."""
    from dicom_node.config import hide_url_password

    assert hide_url_password(url) == shown


@pytest.mark.parametrize(
    "key",
    [
        "network.pdu_read_timeout_seconds",
        "network.association_request_timeout_seconds",
        "network.network_timeout_seconds",
        "dispatch.timeout_seconds",
        "dispatch.max_retry_seconds",
        "completion.expected_count_timeout_seconds",
        "retention.check_interval_seconds",
        "console.echo_interval_seconds",
        "database.busy_timeout_seconds",
    ],
)
def test_a_timeout_longer_than_a_day_is_refused(tmp_path, key):
    section, name = key.split(".")
    message = refusal(tmp_path, {section: {name: 1e10}})
    assert f"{key} must be at most 86400 seconds (one day)" in message
    assert f"env DICOM_NODE_{section.upper()}__{name.upper()}" in message


@pytest.mark.parametrize(
    ("retention", "expected"),
    [
        ({"days": 1e9}, "retention.days must be at most 36500 days"),
        ({"results_days": 40000}, "retention.results_days must be at most 36500 days"),
        ({"quarantine_days": 1e6}, "retention.quarantine_days must be at most 36500 days"),
        ({"days": True}, "retention.days must be a number, not true or false"),
        ({"quarantine_days": False}, "retention.quarantine_days must be a number, not true or false"),
    ],
)
def test_retention_periods_are_numbers_of_days_within_a_century(tmp_path, retention, expected):
    assert expected in refusal(tmp_path, {"retention": retention})


def test_a_retention_period_from_the_environment_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("DICOM_NODE_RETENTION__DAYS", "7.5")
    assert load_settings(write(tmp_path, {})).retention.days == 7.5


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("DICOM_NODE_RETENTION_DAYS", "(did you mean DICOM_NODE_RETENTION__DAYS?)"),
        ("DICOM_NODE_RETENSION__DAYS", "(did you mean DICOM_NODE_RETENTION__DAYS?)"),
        ("DICOM_NODE_NETWORK__PORT__X", ""),
        ("DICOM_NODE_MODELS__M__TOTALSEGMENTATOR__TILE_STEP_SIZE", ""),
    ],
)
def test_an_unknown_environment_variable_is_refused(tmp_path, monkeypatch, variable, expected):
    monkeypatch.setenv(variable, "1")
    message = refusal(tmp_path, {})
    assert f"unknown environment variable {variable}" in message and expected in message
    assert "it names no setting, so it would be ignored" in message


def test_environment_variables_that_name_settings_or_the_node_are_accepted(tmp_path, monkeypatch):
    for name, value in {
        "DICOM_NODE_CONFIG": str(write(tmp_path, {"models": {"m": {"kind": "totalsegmentator"}}})),
        "DICOM_NODE_WORKER_NAME": "gpu1",
        "DICOM_NODE_MODELS__M__TILE_STEP_SIZE": "0.5",
        "DICOM_NODE_PEERS__PACS__HOSTS": '["10.1.2.3"]',
        "DICOM_NODE_NETWORK__TLS": "null",
        "dicom_node_retention__days": "3",
    }.items():
        monkeypatch.setenv(name, value)

    settings = load_settings()

    assert settings.models["m"].tile_step_size == 0.5 and settings.retention.days == 3  # type: ignore[union-attr]
    assert settings.peers["pacs"].hosts == ["10.1.2.3"]


def test_a_model_setting_is_named_by_its_key_and_variable(tmp_path):
    message = refusal(tmp_path, {"models": {"m": {"kind": "totalsegmentator", "tile_step_size": 2}}})
    assert "models.m.tile_step_size: Input should be less than or equal to 1" in message
    assert "[YAML key models.m.tile_step_size or env DICOM_NODE_MODELS__M__TILE_STEP_SIZE]" in message
    assert "totalsegmentator.tile_step_size" not in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"network": {"maximum_associations": 16, "maximum_associations_per_host": 512}},
            "maximum_associations_per_host (512) must be at most maximum_associations (16)",
        ),
        (
            {"network": {"maximum_associations": 16, "maximum_associations_per_peer": 4}},
            "maximum_associations_per_peer (4) must be between maximum_associations_per_host (8) and "
            "maximum_associations (16)",
        ),
        (
            {"completion": {"quiet_seconds": 30, "expected_count_timeout_seconds": 1}},
            "completion.expected_count_timeout_seconds (1) must be at least completion.quiet_seconds (30)",
        ),
        ({"completion": {"quiet_seconds": 0.001}}, "completion.quiet_seconds must be at least 1 second"),
        (
            {"rules": [{"name": "ct", "action": "ignore"}, {"name": "ct", "action": "ignore"}]},
            "rules[1]: the name 'ct' is used by an earlier rule",
        ),
    ],
)
def test_a_limit_that_would_switch_off_its_protection_is_refused(tmp_path, data, expected):
    assert expected in refusal(tmp_path, data)


def test_unset_limits_follow_the_ones_set(tmp_path):
    settings = load_settings(
        write(tmp_path, {"network": {"maximum_associations": 4}, "completion": {"quiet_seconds": 900}})
    )
    assert settings.network.maximum_associations_per_host == 4
    assert settings.network.maximum_associations_per_peer == 4
    assert settings.completion.expected_count_timeout_seconds == 900
    assert load_settings(write(tmp_path, {})).network.maximum_associations_per_peer == 12  # 3/4 of 16


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////var/lib/dicom-node/node.db",
        "sqlite+pysqlite:////srv/n.db",
        "postgresql+psycopg://node:secret@db.example.org/node",
    ],
)
def test_a_database_url_naming_a_file_or_a_server_is_accepted(tmp_path, url):
    assert load_settings(write(tmp_path, {"database": {"url": url}})).database.url == url


def test_a_relative_sqlite_file_is_relative_to_the_config_file_not_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    config = write(tmp_path / "etc", {"database": {"url": "sqlite:///state/node.db"}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # systemd starts serve in /, an admin runs status from their home

    settings = load_settings(config)

    assert settings.database_url == f"sqlite:///{tmp_path / 'etc' / 'state' / 'node.db'}"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite://", "is an in-memory SQLite database"),
        ("sqlite:///file::memory:?uri=true", "is an in-memory SQLite database"),
        ("sqlite:///x.db?mode=memory&uri=true", "is an in-memory SQLite database"),
        ("sqlite://data/x.db", "is not a SQLite URL the node can use: it names a host (data) where the file's path"),
        ("sqlite://user:pw@data/x.db", "is not a SQLite URL the node can use: it names a host where the file's path"),
    ],
)
def test_a_sqlite_url_that_names_no_file_the_node_can_keep_is_refused(tmp_path, url, expected):
    message = refusal(tmp_path, {"database": {"url": url}})
    assert f"database.url {expected}" in message
    assert "pw" not in message
