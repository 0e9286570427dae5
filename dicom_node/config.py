"""The node's configuration: one pydantic model tree, read from YAML and environment.

Precedence, highest first: environment variables (``DICOM_NODE_`` prefix, ``__``
between nested keys, e.g. ``DICOM_NODE_NETWORK__PORT=11112``), the YAML file,
the defaults below. Lists and mappings in environment variables are JSON.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import re2
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

ENV_PREFIX = "DICOM_NODE_"
ENV_NESTED_DELIMITER = "__"
CONFIG_PATH_ENV = "DICOM_NODE_CONFIG"

AE_TITLE_PATTERN = r"^[\x20-\x5b\x5d-\x7e]+$"
"""The pattern of :data:`AETitle` (printable ASCII but backslash), recognised in validation errors so that they
can be said in words."""
AETitle = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=16, pattern=AE_TITLE_PATTERN),
]
"""A DICOM AE title: 1-16 printable ASCII characters, no backslash."""


class ConfigError(Exception):
    """The configuration is invalid; the message names each key and its problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Role = Literal["store", "find", "move", "get", "echo"]
"""What a peer may do: C-STORE to the node, C-FIND, C-MOVE, C-GET, C-ECHO."""
ALL_ROLES: tuple[Role, ...] = ("store", "find", "move", "get", "echo")

PDU_SIZE_CEILING = 16 * 1024 * 1024
"""``maximum_pdu_size: 0`` (formerly "no limit") advertises and enforces this many bytes."""

DAY_SECONDS = 86400
"""The longest any timeout or interval in seconds may be: longer ones overflow the clocks they are given to."""
MAX_DAYS = 36500
"""The longest retention period, days (a hundred years)."""
OWN_ENV_VARIABLES = frozenset({CONFIG_PATH_ENV, "DICOM_NODE_WORKER_NAME"})
"""``DICOM_NODE_*`` variables the code reads itself rather than as settings."""
SECRET_KEYS = frozenset({"session_secret", "metrics_token", "password_hash"})
"""Keys whose values no message may show."""
NARROWEST_PROXY_PREFIX = {4: 16, 6: 48}
"""A trusted proxy network may be at most this wide (prefix length, by IP version)."""


def _not_a_flag(value: Any) -> Any:
    """Refuse true/false where a number is meant (pydantic would read true as 1)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


Days = Annotated[float, BeforeValidator(_not_a_flag), Field(gt=0, le=MAX_DAYS)]
"""A retention period in days: more than 0, at most a hundred years, never a boolean."""


def host_problem(host: str, *, listening: bool = False, port_key: str = "port") -> str | None:
    """Why ``host`` (surrounding spaces already stripped) cannot be a host name or IP address to call, or with
    ``listening`` one to listen on (where 0.0.0.0 and :: mean every address); None when it can. ``port_key``: where
    the port is given instead."""
    if not host:
        return (
            "must not be empty: give a host name or IP address (an unset variable in docker-compose gives an empty one)"
        )
    if any(c.isspace() for c in host):
        return f"{host!r} holds a space: a host name or IP address has none"
    address = ip_address_of(host)
    if address is None and ":" in host:
        if re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]+):\d+", host):
            return f"{host!r} looks like host:port: give the host alone here, and the port in {port_key}"
        return f"{host!r} is not a host name or IP address"
    if address is not None and address.is_unspecified and not listening:
        return (
            f"{host!r} is no address to call: it means every address of this machine when listening; give the "
            "peer's host name or IP address"
        )
    return None


def ip_address_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address ``host`` is written as (IPv4 shorthand such as ``127.1`` or ``0`` too, as the system reads
    it), or None for a host name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fA-FxX.]+", host) and host[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _calling_host(value: Any) -> Any:
    """A host to call (a destination, a peer's C-MOVE address): surrounding spaces stripped, refused where it is
    no host name or address (:func:`host_problem`)."""
    if not isinstance(value, str):
        return value
    problem = host_problem(value.strip())
    if problem:
        raise ValueError(problem)
    return value.strip()


def _listening_host(value: Any) -> Any:
    """An address to listen on: as :func:`_calling_host`, but 0.0.0.0 and :: (every address) are allowed."""
    if not isinstance(value, str):
        return value
    problem = host_problem(value.strip(), listening=True)
    if problem:
        raise ValueError(problem)
    return value.strip()


CallingHost = Annotated[str, BeforeValidator(_calling_host)]
"""A peer's host name or IP address: not empty, no spaces, no port, not 0.0.0.0 or ::."""
ListeningHost = Annotated[str, BeforeValidator(_listening_host)]
"""An address the node listens on: not empty, no spaces, no port; 0.0.0.0 or :: for every address."""


class TlsSettings(_Strict):
    """DICOM TLS: the listening port speaks TLS only; the same files serve associations the node opens."""

    certificate: Path = Field(
        description="The node's certificate (PEM), with any intermediate certificates; a relative path is relative "
        "to the config file, as every TLS path here."
    )
    private_key: Path = Field(description="The certificate's private key (PEM, unencrypted; keep it 0600).")
    ca_certificates: Path | None = Field(
        None, description="CA bundle (PEM) that peers' certificates must chain to; default: the system's."
    )
    require_client_certificate: bool = Field(
        False, description="Mutual TLS: callers must present a certificate signed by ca_certificates (then required)."
    )
    minimum_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    check_hostname: bool = Field(
        True, description="When calling a peer, its certificate must name the host (or IP) configured for it."
    )

    @model_validator(mode="after")
    def _clients_checked_against_a_named_ca(self) -> TlsSettings:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError(
                "require_client_certificate needs ca_certificates: the CA bundle callers' certificates must chain "
                "to (without it every caller would be refused, and trusting every public CA would admit anyone "
                "with a certificate)"
            )
        return self


class NetworkSettings(_Strict):
    """Where the node listens, and the limits every caller meets before and after association."""

    ae_title: AETitle = "DICOMNODE"
    host: ListeningHost = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    allowed_calling_ae_titles: list[AETitle] = Field(
        default_factory=list,
        description="Deprecated, use `peers`: these AE titles are admitted from any host with every role.",
    )
    require_called_ae_title: bool = Field(
        True, description="Reject associations whose called AE title is not ours (catches misrouted senders)."
    )
    maximum_pdu_size: int = Field(
        4 * 1024 * 1024,
        ge=0,
        le=PDU_SIZE_CEILING,
        description="Largest PDU we advertise and accept, bytes; a bigger one aborts the association. "
        "0 means the ceiling, 16 MiB.",
    )
    maximum_association_request_bytes: int = Field(
        256 * 1024, ge=4096, le=4 * 1024 * 1024, description="Largest A-ASSOCIATE-RQ accepted, bytes."
    )
    maximum_associations: int = Field(16, ge=1, le=512)
    maximum_data_set_megabytes: float = Field(
        3000.0,
        gt=0,
        description=(
            "Largest data set one C-STORE (or other request) may carry, MB (10^6 bytes). pynetdicom holds a "
            "data set in memory until it is whole, so this bounds what one association can make the node hold; "
            "a larger one aborts the association. A 512 x 512 CT image is 0.5 MB; an enhanced CT of 5000 "
            "frames (admission.max_instances) about 2620 MB."
        ),
    )
    maximum_in_flight_megabytes: float = Field(
        6000.0,
        gt=0,
        description=(
            "Data sets still arriving (not yet answered) that the node holds in memory at a time, from all "
            "associations of all receiving processes together, MB. An association whose next fragment would "
            "take the node over this is aborted (its sender can send again), so senders together cannot make "
            "the node run out of memory. At least maximum_data_set_megabytes (when not set: the larger of 6000 "
            "and maximum_data_set_megabytes)."
        ),
    )
    maximum_associations_per_host: int = Field(
        8, ge=1, le=512, description="Open connections one source address may hold; more are closed at once."
    )
    maximum_associations_per_peer: int | None = Field(
        None,
        ge=1,
        le=512,
        description="Open connections one entry of `peers` that sends images may hold from all its addresses "
        "together (a scanner network given as a CIDR, a host calling from two addresses); more are closed at once. "
        "Not set: three quarters of maximum_associations (at least maximum_associations_per_host), so that one "
        "peer never takes every place from the others.",
    )
    association_request_timeout_seconds: float = Field(
        10.0, gt=0, le=DAY_SECONDS, description="A new connection must complete its A-ASSOCIATE-RQ within this long."
    )
    pdu_read_timeout_seconds: float = Field(
        30.0, gt=0, le=DAY_SECONDS, description="Once a PDU starts, all of it must arrive within this long."
    )
    minimum_message_kilobytes_per_second: float = Field(
        2.0,
        gt=0,
        le=100_000,
        description="Once pdu_read_timeout_seconds have passed, a message (a request and its data set) must keep "
        "arriving at this rate on average on its association, else A-ABORT: a peer keeping an association busy a "
        "few bytes at a time cannot hold a place of maximum_associations. Per association: a sender on a slow link "
        "with several associations at once gets a share of the link on each.",
    )
    network_timeout_seconds: float = Field(60.0, gt=0, le=DAY_SECONDS)
    tls: TlsSettings | None = Field(None, description="DICOM TLS; absent: plain TCP.")

    @model_validator(mode="after")
    def _in_flight_holds_one_data_set(self) -> NetworkSettings:
        if "maximum_in_flight_megabytes" not in self.model_fields_set:  # a configuration from before the setting
            self.maximum_in_flight_megabytes = max(self.maximum_in_flight_megabytes, self.maximum_data_set_megabytes)
        if self.maximum_in_flight_megabytes < self.maximum_data_set_megabytes:
            raise ValueError(
                f"maximum_in_flight_megabytes ({self.maximum_in_flight_megabytes:g}) must be at least "
                f"maximum_data_set_megabytes ({self.maximum_data_set_megabytes:g}), or the largest data set "
                "allowed could never be received"
            )
        return self

    @model_validator(mode="after")
    def _one_host_within_all(self) -> NetworkSettings:
        if "maximum_associations_per_host" not in self.model_fields_set:  # the default follows a lower total
            self.maximum_associations_per_host = min(self.maximum_associations_per_host, self.maximum_associations)
        if self.maximum_associations_per_host > self.maximum_associations:
            raise ValueError(
                f"maximum_associations_per_host ({self.maximum_associations_per_host}) must be at most "
                f"maximum_associations ({self.maximum_associations}), or one host could take every association"
            )
        if self.maximum_associations_per_peer is None:
            share = max(self.maximum_associations_per_host, math.ceil(self.maximum_associations * 3 / 4))
            self.maximum_associations_per_peer = min(share, self.maximum_associations)
        if not self.maximum_associations_per_host <= self.maximum_associations_per_peer <= self.maximum_associations:
            raise ValueError(
                f"maximum_associations_per_peer ({self.maximum_associations_per_peer}) must be between "
                f"maximum_associations_per_host ({self.maximum_associations_per_host}) and maximum_associations "
                f"({self.maximum_associations})"
            )
        return self

    @property
    def receive_pdu_limit(self) -> int:
        """The PDU size advertised and enforced, bytes."""
        return self.maximum_pdu_size or PDU_SIZE_CEILING


class PeerSettings(_Strict):
    """A DICOM peer the node admits: its AE title, the hosts it calls from, and what it may do."""

    ae_title: AETitle | None = Field(None, description="Calling AE title; absent: any AE title from these hosts.")
    hosts: list[str] = Field(description="Addresses or CIDR networks the peer calls from, e.g. 10.1.2.3, 10.1.0.0/16.")
    roles: list[Role] = Field(default_factory=lambda: list[Role](["store", "echo"]))
    tls: bool = Field(False, description="Associations the node opens to this peer (C-MOVE) use TLS.")
    certificate_names: list[str] = Field(
        default_factory=list,
        description="With mutual TLS: the peer's client certificate must carry one of these names (its subject's "
        "common name, or a DNS name or IP address of its subjectAltName); empty: any certificate the CA signed.",
    )
    host: CallingHost | None = Field(None, description="Where the peer listens, for C-MOVE to it.")
    port: int | None = Field(None, ge=1, le=65535)

    @field_validator("hosts")
    @classmethod
    def _networks(cls, hosts: list[str]) -> list[str]:
        if not hosts:
            raise ValueError("give at least one address or network")
        for host in hosts:
            _peer_network(host.strip())
        return [h.strip() for h in hosts]

    @field_validator("roles", mode="before")
    @classmethod
    def _one_or_many_roles(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _address_whole(self) -> PeerSettings:
        if (self.host is None) != (self.port is None):
            raise ValueError("host and port go together (where the node reaches the peer)")
        return self


def _peer_network(host: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The network ``host`` names; refused where it is not one, or where its address has bits past the prefix
    (``10.1.2.3/8`` would silently admit all of 10.0.0.0/8)."""
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address or CIDR network (e.g. 10.1.0.0/16)") from None
    try:
        ipaddress.ip_network(host)
    except ValueError:
        address = host.split("/", 1)[0]
        raise ValueError(
            f"{host!r} has an address with bits set past its /{network.prefixlen} prefix, which would admit all of "
            f"{network}: write {address}/{network.max_prefixlen} for that one host, or {network} for the network"
        ) from None
    return network


def open_peer_warnings(settings: Settings) -> list[str]:
    """Sentences for start-up warnings: each peer that admits every address of IPv4 or IPv6 (or both) with a role
    that reads patient data. ``0.0.0.0/0`` is every IPv4 address and ``::/0`` every IPv6 address: neither admits
    the other's callers (an IPv4 caller of a dual-stack node is matched as IPv4)."""
    reading = ("find", "get", "move")
    warnings = []
    for name, peer in settings.peers.items():
        anywhere = [h for h in peer.hosts if ipaddress.ip_network(h, strict=False).prefixlen == 0]
        roles = [r for r in peer.roles if r in reading]
        if anywhere and roles:
            who = f"AE title {peer.ae_title}" if peer.ae_title else "any AE title"
            warnings.append(
                f"peers.{name} admits {who} from {_every_address(anywhere)} ({', '.join(anywhere)}) with the roles "
                f"{', '.join(roles)}: anyone who can reach the port can read patient data; list the hosts "
                f"it calls from in peers.{name}.hosts"
            )
    return warnings


def _every_address(networks: list[str]) -> str:
    """What networks of prefix length 0 admit, in words: every IPv4 address, every IPv6 address, or both."""
    versions = {ipaddress.ip_network(n, strict=False).version for n in networks}
    if versions == {4, 6}:
        return "every address"
    return "every IPv4 address" if versions == {4} else "every IPv6 address"


class RetrieveSettings(_Strict):
    """Limits on Query/Retrieve answers."""

    max_find_matches: int = Field(
        1000, ge=1, description="A C-FIND stops after this many matches with status 0xA700 (out of resources)."
    )
    max_instances_per_retrieval: int = Field(
        10000, ge=1, description="A C-MOVE or C-GET selecting more instances is refused with 0xA701 / 0xA702."
    )
    queries_per_minute_without_find: int = Field(
        60,
        ge=1,
        description="A peer without the find role may make this many (narrow) C-FIND queries a minute on the node "
        "(each of N receiving processes allows 1/N of them); more are refused with 0xA700, so accession numbers "
        "cannot be tried one after another.",
    )


class StorageSettings(_Strict):
    """Where received instances and results live on disk."""

    directory: Path = Path("data")
    fsync: bool = Field(True, description="fsync every instance before answering success; turn off only on test rigs.")
    disk_full_retry_seconds: float = Field(
        60.0,
        gt=0,
        le=DAY_SECONDS,
        description="A job whose processing found the disk full (or the results folder read-only, failing or not "
        "accessible) is queued again and tried after this many seconds.",
    )
    quarantine_reserve_gigabytes: float = Field(
        5.0,
        ge=0,
        description="The bytes of a refused instance are kept in quarantine/ only while the disk keeps this much "
        "free after them: a sender of refused data cannot fill the disk the images it accepts need.",
    )


class ReceiveSettings(_Strict):
    """How the node receives: processes that accept associations (C-ECHO, C-STORE, Q/R)."""

    processes: int = Field(
        0,
        ge=0,
        le=32,
        description="Receiving processes sharing the port; 0: two per CPU core (at most 8); "
        "1: receive in serve's own process.",
    )
    unresponsive_seconds: float = Field(
        30.0,
        ge=2,
        le=3600,
        description="A receiving process whose accepting loop has not run for this long (stopped or hung) is "
        "ended and started again, as one that died; only with receive.processes above 1.",
    )


class DatabaseSettings(_Strict):
    url: str | None = Field(None, description="SQLAlchemy URL; default is a SQLite file in the storage directory.")
    busy_timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=DAY_SECONDS,
        description="How long a write waits for another process' lock on the SQLite file before it retries "
        "(the worker) or answers the C-STORE with 0xA700 (the receiver).",
    )

    @field_validator("url")
    @classmethod
    def _a_sqlite_file(cls, url: str | None) -> str | None:
        problem = sqlite_url_problem(url) if url else None
        if problem:
            raise ValueError(problem)
        return url


def sqlite_url_problem(url: str) -> str | None:
    """Why ``url``, a SQLite URL, names no database file the node can keep (in memory, or a host before the path),
    or None (also for a URL of another kind, or none: :func:`dicom_node.cli.config_check` says so)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    if parsed.host or parsed.port or parsed.username:
        host = f" ({parsed.host})" if parsed.host and not parsed.password else ""
        return (
            f"is not a SQLite URL the node can use: it names a host{host} where the file's path belongs; the path "
            "follows three slashes: sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    database = str(parsed.database or "")
    if database in ("", ":memory:") or database.startswith("file::memory:") or parsed.query.get("mode") == "memory":
        return (
            "is an in-memory SQLite database: every job and image record would be lost at each stop, and no worker "
            "or command could reach it; give a file (sqlite:////var/lib/dicom-node/dicom-node.db), or leave "
            "database.url out for the file in storage.directory"
        )
    return None


class CompletionSettings(_Strict):
    """When a series counts as complete."""

    quiet_seconds: float = Field(
        30.0,
        ge=1,
        le=DAY_SECONDS,
        description=(
            "A series is complete this long after its last instance arrived. 30 s covers a PACS "
            "that re-opens an association or pauses between batches, and still starts work within "
            "a minute; a series whose ImagesInAcquisition count is reached completes at once."
        ),
    )
    check_interval_seconds: float = Field(1.0, gt=0, le=60)
    expected_count_timeout_seconds: float = Field(
        600.0,
        gt=0,
        le=DAY_SECONDS,
        description=(
            "While fewer images than the series' ImagesInAcquisition have arrived, the quiet period "
            "does not complete it; this longer silence does, and the job gets a 'partial series' warning."
        ),
    )

    @model_validator(mode="after")
    def _expected_count_waits_longer(self) -> CompletionSettings:
        if "expected_count_timeout_seconds" not in self.model_fields_set:  # the default follows a longer quiet period
            self.expected_count_timeout_seconds = max(self.expected_count_timeout_seconds, self.quiet_seconds)
        if self.expected_count_timeout_seconds < self.quiet_seconds:
            raise ValueError(
                f"completion.expected_count_timeout_seconds ({self.expected_count_timeout_seconds:g}) must be at "
                f"least completion.quiet_seconds ({self.quiet_seconds:g}), or a series still short of its "
                "ImagesInAcquisition count would be completed before the quiet period of any other series"
            )
        return self


class AdmissionSettings(_Strict):
    """Header checks between COMPLETE and QUEUED: what is refused before any inference time is spent."""

    max_instances: int = Field(
        5000, ge=1, description="A series with more images (frames) than this is refused before its headers are read."
    )
    max_memory_gigabytes: float = Field(
        32.0,
        gt=0,
        description="Refuse a series whose estimated processing memory (every stage) exceeds this; about half "
        "the machine's memory. 32 GB admits 512 x 512 images up to about 3700 slices 1 mm apart.",
    )
    max_matrix: int = Field(
        2048, ge=64, le=65535, description="Largest Rows or Columns admitted (CT is reconstructed at 512 to 2048)."
    )
    missing_rescale: Literal["refuse", "assume_identity"] = Field(
        "refuse",
        description="CT images without RescaleSlope/RescaleIntercept: refuse, or process as slope 1, intercept 0 "
        "with a warning on the job.",
    )
    mixed_series: Literal["refuse", "largest"] = Field(
        "refuse",
        description="Images with different matrix size or pixel spacing in one series: refuse, or process the "
        "largest group of alike images with a warning on the job.",
    )


class Destination(_Strict):
    """A DICOM peer results are sent to (and C-MOVE may target)."""

    ae_title: AETitle
    host: CallingHost = Field(description="Host name or IP address; not 0.0.0.0 or ::, no port.")
    port: int = Field(ge=1, le=65535)
    segmentation_type: Literal["BINARY", "LABELMAP"] = Field(
        "BINARY",
        description="BINARY: widest viewer support; LABELMAP: one frame per slice, smaller for many structures.",
    )
    send: list[Literal["seg", "sr", "rtstruct"]] = Field(
        default_factory=lambda: list[Literal["seg", "sr", "rtstruct"]](["seg", "sr"]),
        description="Which results go there; planning systems: [rtstruct].",
    )
    tls: bool = Field(False, description="Send over DICOM TLS (network.tls gives the certificates).")


class ResultSettings(_Strict):
    """Results every processed series yields and the node keeps for query/retrieve, besides what destinations ask for."""

    segmentation_types: list[Literal["BINARY", "LABELMAP"]] = Field(
        default_factory=list, description="SEG encodings always made; none: BINARY when no destination asks for one."
    )
    rtstruct: bool = Field(False, description="Always make an RTSTRUCT (for planning systems that pull it).")
    rtstruct_max_points_per_structure: int = Field(
        100_000, ge=100, description="Contour points one RTSTRUCT structure may hold before it is simplified further."
    )
    rtstruct_max_megabytes: float = Field(
        40.0, gt=0, description="Size an RTSTRUCT aims to stay under; shared evenly between its structures."
    )


class DispatchSettings(_Strict):
    """Sending results: retries with exponential backoff, then FAILED with the reason."""

    max_attempts: int = Field(5, ge=1, le=100)
    first_retry_seconds: float = Field(
        10.0, gt=0, le=DAY_SECONDS, description="Wait before the 2nd attempt; doubles each time."
    )
    max_retry_seconds: float = Field(600.0, gt=0, le=DAY_SECONDS)
    timeout_seconds: float = Field(
        30.0, gt=0, le=DAY_SECONDS, description="Association timeout, and the DIMSE timeout of an empty object."
    )
    seconds_per_megabyte: float = Field(
        1.0,
        ge=0,
        le=3600,
        description="Added to a C-STORE's DIMSE timeout per MB of the object sent (0: fixed timeout); also bounds "
        "each instance sent to a C-GET requestor or C-MOVE destination.",
    )
    parallel_sends: int = Field(
        4, ge=1, le=64, description="Destinations sent to at once; each destination gets one association at a time."
    )
    check_interval_seconds: float = Field(1.0, gt=0, le=60)
    unreachable_hours: float = Field(
        24.0,
        gt=0,
        le=24 * MAX_DAYS,
        description="A destination that cannot be reached (down, not answering) is tried again, every "
        "max_retry_seconds at most, for this long before its jobs fail; such tries do not use up max_attempts.",
    )


class RetentionSettings(_Strict):
    """Purging received images and results of finished series (DONE, FAILED, IGNORED) only.

    Everything off by default: nothing is deleted until an age or a disk budget is set.
    """

    days: Days | None = Field(
        None, description="Purge a finished series' images (and results) this many days after it finished."
    )
    results_days: Days | None = Field(
        None, description="Keep results (job folder, SEG/SR/RTSTRUCT) this long instead; default: as `days`."
    )
    max_disk_gigabytes: float | None = Field(
        None, gt=0, description="Budget for images plus results; over it, the oldest finished series go first."
    )
    quarantine_days: Days | None = Field(
        None,
        description="Delete refused instances (quarantine/ files and their rows) this many days after arrival.",
    )
    audit_days: Days | None = Field(
        None, description="Delete audit records (table audit_events) this many days after they were written."
    )
    check_interval_seconds: float = Field(
        600.0, gt=0, le=DAY_SECONDS, description="How often `serve` applies retention."
    )

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.days, self.results_days, self.max_disk_gigabytes))


class Range(_Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self

    def contains(self, value: float | None) -> bool:
        if value is None:
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class RuleMatch(_Strict):
    """Conditions on a series; every condition given must hold (absent ones are ignored)."""

    modality: list[str] | None = None
    series_description: str | None = Field(
        None,
        description="Regular expression, searched in SeriesDescription; RE2 syntax (Python's without look-around, "
        "back-references or \\Z), matched in time proportional to the text whatever a peer sends.",
    )
    image_type: list[str] | None = Field(None, description="Values that must all be in ImageType.")
    slice_thickness: Range | None = None
    number_of_images: Range | None = None
    calling_ae_title: list[str] | None = None
    body_part_examined: list[str] | None = None

    @field_validator("modality", "image_type", "calling_ae_title", "body_part_examined", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("series_description")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        if value is not None:
            rule_pattern(value)
        return value


def _re2_options() -> Any:
    options = re2.Options()
    options.log_errors = False  # the reason goes into the configuration error, not to stderr
    return options


_RE2_OPTIONS = _re2_options()


@functools.lru_cache(maxsize=1024)
def rule_pattern(pattern: str) -> Any:
    """A rule's regular expression compiled by RE2, which matches in time proportional to the text whatever the
    pattern: a crafted SeriesDescription cannot hold a receiving thread or the watcher (Python's backtracking
    ``re`` can take minutes on ``(a+)+$``). Raises ``ValueError`` saying why a pattern cannot be used."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        why = exc.args[0] if exc.args else "unknown error"
        why = why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)
        raise ValueError(
            f"not a valid regular expression for routing ({why}): rules are matched by RE2, which is never slow "
            "whatever a peer sends but has no look-around ((?=, (?!, (?<=, (?<!), no back-references (\\1), "
            "and \\Z is written \\z"
        ) from None


class Rule(_Strict):
    """A routing rule: the first rule whose match holds decides what happens to a series."""

    name: str
    match: RuleMatch = Field(default_factory=RuleMatch)
    action: Literal["process", "ignore"]
    model: str | None = Field(None, description="Model to run (name from `models`); required for process.")
    destinations: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _process_needs_model(self) -> Rule:
        if self.action == "process" and not self.model:
            raise ValueError(f"rule {self.name!r}: action 'process' needs a model")
        return self


class ThresholdModelSettings(_Strict):
    """The classical baseline: body, lungs and bones from HU thresholds (no weights needed)."""

    kind: Literal["threshold"]


class TotalSegmentatorModelSettings(_Strict):
    """A TotalSegmentator nnU-Net task run with nnU-Net's predictor on TotalSegmentator's weights layout."""

    kind: Literal["totalsegmentator"]
    task: Literal["total", "total_fast"] = "total"
    weights_directory: Path | None = Field(
        None,
        description="Folder holding the Dataset... model folders (relative to the config file); default "
        "$TOTALSEG_WEIGHTS_PATH, else <storage>/weights.",
    )
    tile_step_size: float = Field(0.8, gt=0, le=1, description="Sliding-window step (TotalSegmentator: 0.8).")
    backend: Literal["auto", "torch", "openvino"] = Field(
        "auto",
        description="What runs the network on the CPU: openvino (converted once, cached in <weights>/.openvino; "
        "about 0.7 of torch's time per tile here, label maps matching TotalSegmentator's to mean Dice >= 0.99), "
        "torch (nnU-Net's own, voxel-identical to TotalSegmentator), or auto: openvino where it is installed, "
        "else torch. On CUDA the network always runs in PyTorch.",
    )
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "auto",
        description="OpenVINO precision: auto is BF16 only on a CPU with native BF16 where BF16 matches FP32 "
        "(mean Dice >= 0.99 on a calibration phantom), else FP32.",
    )


ModelSettings = Annotated[ThresholdModelSettings | TotalSegmentatorModelSettings, Field(discriminator="kind")]
_MODEL_KINDS = frozenset(
    kind
    for model in (ThresholdModelSettings, TotalSegmentatorModelSettings)
    for kind in get_args(model.model_fields["kind"].annotation)
)
"""The values of a model's ``kind``, which pydantic puts in an error's location after the model's name."""


class InferenceSettings(_Strict):
    """The inference workers: separate processes that claim QUEUED series."""

    workers: int = Field(
        1, ge=0, le=16, description="Worker processes `serve` starts; 0 = run `dicom-node worker` yourself."
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when available, else CPU.")
    cpu_threads: int | None = Field(None, ge=1, description="Torch and OpenVINO CPU threads; default: all cores.")
    poll_seconds: float = Field(1.0, gt=0, le=60)
    prefetch_next_series: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Decode the next queued series while the current one is segmented. auto: on when the models "
        "run on a CUDA GPU (the CPU is then mostly idle); on a CPU both would share the same cores.",
    )
    partial_series: Literal["process", "fail"] = Field(
        "process",
        description="A series of which only part can be one volume (a second acquisition, another matrix size): "
        "process it with a warning in every result, or fail it.",
    )
    max_worker_deaths: int = Field(
        2, ge=1, le=100, description="A job whose worker died this many times is FAILED instead of queued again."
    )
    lease_seconds: float = Field(
        60.0,
        ge=1,
        le=3600,
        description="A claimed job's lease: a worker (on any host) that has not renewed it for this long is taken "
        "for dead and its job is queued again (counted against max_worker_deaths).",
    )
    lease_renew_seconds: float = Field(
        15.0, gt=0, le=1200, description="How often a working worker renews its lease; well under lease_seconds."
    )
    worker_start_seconds: float = Field(
        60.0,
        ge=1,
        le=3600,
        description="Allowed for a new worker process to start Python and import its libraries before its first sign "
        "of life; one silent for longer (plus the idle limit) is taken for frozen, ended and replaced.",
    )
    shutdown_grace_seconds: float = Field(
        25.0,
        ge=0,
        le=3600,
        description="On SIGTERM a worker finishes its job for this long, then hands it back (queued again, not a death).",
    )
    job_timeout_minutes: Annotated[float, BeforeValidator(_not_a_flag), Field(gt=0, le=7 * 24 * 60)] | None = Field(
        360.0,
        description="A job still processing after this many minutes is taken for hung: `serve` ends its worker (one "
        "of its own) and the job is queued again, counted against max_worker_deaths. Size it well above the "
        "slowest model's time (TotalSegmentator total on 2 CPU cores: about 30 min); null: no limit.",
    )

    @model_validator(mode="after")
    def _renew_well_within_the_lease(self) -> InferenceSettings:
        if self.lease_renew_seconds * 2 > self.lease_seconds:
            raise ValueError(
                f"inference.lease_renew_seconds ({self.lease_renew_seconds:g}) must be at most half of "
                f"inference.lease_seconds ({self.lease_seconds:g}), so one late renewal does not lose the job"
            )
        return self


ConsoleRole = Literal["viewer", "operator"]
"""Console roles: a viewer reads every page; an operator may also retry, re-route and cancel."""


def _operators_only() -> list[ConsoleRole]:
    return ["operator"]


class ConsoleUser(_Strict):
    """A console login: an argon2 hash made by `dicom-node user add` (never the password itself)."""

    password_hash: str = Field(description="argon2id hash from `dicom-node user add NAME --role ROLE`.")
    role: ConsoleRole = "viewer"

    @field_validator("password_hash")
    @classmethod
    def _argon2(cls, value: str) -> str:
        if not value.startswith("$argon2"):
            raise ValueError("not an argon2 hash: make one with `dicom-node user add NAME --role viewer|operator`")
        return value


class ConsoleSettings(_Strict):
    """The operations console: web pages, a JSON API and Prometheus metrics, served by `serve`."""

    enabled: bool = Field(False, description="Serve the console from `serve`.")
    host: ListeningHost = Field("127.0.0.1", description="Address the console listens on; loopback by default.")
    port: int = Field(8080, ge=1, le=65535)
    tls_certificate: Path | None = Field(None, description="HTTPS certificate (PEM); with tls_private_key.")
    tls_private_key: Path | None = Field(None, description="The certificate's private key (PEM).")
    auth: Literal["local", "proxy_header"] = Field(
        "local", description="local: users below log in with a password; proxy_header: a reverse proxy names the user."
    )
    users: dict[str, ConsoleUser] = Field(default_factory=dict, description="Local users (auth: local).")
    proxy_user_header: str = Field("X-Forwarded-User", description="Header naming the user (auth: proxy_header).")
    proxy_role_header: str = Field(
        "X-Forwarded-Role", description="Header giving the role, viewer or operator; absent or other: viewer."
    )
    max_connections: int = Field(
        100,
        ge=1,
        le=500,
        description="Connections the console (and, apart, the metrics listener) holds at once; one more is closed at "
        "once. Bounds what idle clients can take of serve's file handles.",
    )
    max_connections_per_address: int = Field(
        32,
        ge=1,
        le=500,
        description="Connections held from one address (a reverse proxy's address counts all its users).",
    )
    request_seconds: float = Field(
        20.0,
        gt=0,
        le=600,
        description="A request (headers and body) must arrive whole within this many seconds of its connection's "
        "opening, or of the previous answer; else the connection is closed.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the console answers to (the Host header: console.hospital.example, *.example.org); "
        "empty: any. Stops DNS rebinding, where another site's page makes a browser send it requests.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description="Addresses or networks the proxy connects from; headers from anyone else are refused.",
    )
    trust_forwarded_for: bool = Field(
        False,
        description="Count the client a request from trusted_proxies names in X-Forwarded-For (the right-most "
        "address that is no trusted proxy) for the login throttle and audit records, instead of the proxy's "
        "address. Turn it on only where the proxy appends the address it was called from or overwrites the header "
        "(nginx: proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for); a proxy that passes on what the "
        "client sent would let the client name any address.",
    )
    session_hours: float = Field(8.0, gt=0, le=24 * 7, description="A login lasts this long.")
    session_secret: str | None = Field(
        None,
        min_length=32,
        description="Key that signs session cookies (32 characters at least: a short one could be guessed and "
        "cookies forged); default: a random key kept in <storage>/console-secret.",
    )
    login_attempts_per_minute: int = Field(
        5, ge=1, le=1000, description="Failed logins one address may make per minute before it must wait."
    )
    show_patient_details_to: list[ConsoleRole] = Field(
        default_factory=_operators_only, description="Roles that see patient name, ID, birth date and accession."
    )
    downloads_allowed_to: list[ConsoleRole] = Field(
        default_factory=_operators_only, description="Roles that may download result files (each is audited)."
    )
    metrics_token: str | None = Field(
        None, description="Bearer token for /metrics; unset: /metrics needs a logged-in user (or metrics_port)."
    )
    metrics_host: ListeningHost = Field("127.0.0.1", description="Address of the separate metrics listener.")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="A separate listener for /metrics, /healthz and /readyz without login."
    )
    metrics_window_jobs: int = Field(
        10000, ge=1, description="Stage-duration and latency histograms cover this many most recent jobs."
    )
    echo_interval_seconds: float = Field(
        300.0,
        ge=0,
        le=DAY_SECONDS,
        description="C-ECHO every destination this often for the destinations page; 0: never.",
    )
    refresh_seconds: float = Field(3.0, gt=0, le=600, description="How often the worklist refreshes itself.")

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            try:
                network = ipaddress.ip_network(host.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address or CIDR network") from None
            widest = NARROWEST_PROXY_PREFIX[network.version]
            if network.prefixlen < widest:
                raise ValueError(
                    f"{host.strip()!r} is too wide for a proxy (at most /{widest} for IPv{network.version}): "
                    "whoever connects from a trusted proxy address names the user and role, operator included, "
                    "so list the proxy's own address or its small network"
                )
        return [h.strip() for h in hosts]

    @model_validator(mode="after")
    def _tls_pair(self) -> ConsoleSettings:
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("tls_certificate and tls_private_key go together (HTTPS)")
        return self

    @property
    def https(self) -> bool:
        return self.tls_certificate is not None


class LoggingSettings(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Settings(BaseSettings):
    """The whole configuration of a node."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        nested_model_default_partial_update=True,
    )

    network: NetworkSettings = Field(default_factory=NetworkSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    receive: ReceiveSettings = Field(default_factory=ReceiveSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    peers: dict[str, PeerSettings] = Field(
        default_factory=dict, description="Who may call the node; none: any AE title from loopback only."
    )
    retrieve: RetrieveSettings = Field(default_factory=RetrieveSettings)
    models: dict[str, ModelSettings] = Field(
        default_factory=lambda: dict[str, ModelSettings](baseline=ThresholdModelSettings(kind="threshold")),
        description="Named models (name -> settings with a 'kind').",
    )
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    results: ResultSettings = Field(default_factory=ResultSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    rules: list[Rule] = Field(default_factory=list)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _references_resolve(self) -> Settings:
        for index, rule in enumerate(self.rules):
            for name in rule.destinations:
                if name not in self.destinations:
                    known = ", ".join(sorted(self.destinations)) or "none configured"
                    raise ValueError(f"rules[{index}] ({rule.name}): unknown destination {name!r} (known: {known})")
            if rule.model and rule.model not in self.models:
                known = ", ".join(sorted(self.models)) or "none configured"
                raise ValueError(f"rules[{index}] ({rule.name}): unknown model {rule.model!r} (known: {known})")
        return self

    @model_validator(mode="after")
    def _rule_names_unique(self) -> Settings:
        seen: set[str] = set()
        for index, rule in enumerate(self.rules):
            if rule.name in seen:
                raise ValueError(
                    f"rules[{index}]: the name {rule.name!r} is used by an earlier rule; give each rule its own "
                    "name, as jobs and logs say which rule decided"
                )
            seen.add(rule.name)
        return self

    @model_validator(mode="after")
    def _destinations_are_others(self) -> Settings:
        own = self.network
        for name, destination in self.destinations.items():
            if destination.ae_title == own.ae_title:
                raise ValueError(
                    f"destinations.{name}.ae_title {destination.ae_title} is the node's own AE title "
                    "(network.ae_title): results must go to another node"
                )
            if destination.port == own.port and _is_this_host(destination.host, own.host):
                raise ValueError(
                    f"destinations.{name} ({destination.host}:{destination.port}) is the node itself "
                    "(network.host and network.port): results sent there would come back as new images"
                )
        return self

    @model_validator(mode="after")
    def _move_targets_unambiguous(self) -> Settings:
        targets = [(f"peers.{n}", p.ae_title, p.host, p.port) for n, p in self.peers.items() if p.ae_title and p.host]
        targets += [(f"destinations.{n}", d.ae_title, d.host, d.port) for n, d in self.destinations.items()]
        first: dict[str, tuple[str, str, int]] = {}
        for key, ae_title, host, port in targets:
            address = (key, host.strip().lower(), port or 0)
            earlier = first.setdefault(str(ae_title), address)
            if earlier[1:] != address[1:]:
                raise ValueError(
                    f"{earlier[0]} and {key} both have the AE title {ae_title} but different addresses "
                    f"({earlier[1]}:{earlier[2]} and {host}:{port}): C-MOVE finds its target by AE title, so one "
                    "AE title must have one address"
                )
        return self

    @model_validator(mode="after")
    def _tls_configured(self) -> Settings:
        if self.network.tls is None:
            wanting = [f"destinations.{n}" for n, d in self.destinations.items() if d.tls]
            wanting += [f"peers.{n}" for n, p in self.peers.items() if p.tls]
            if wanting:
                raise ValueError(f"{', '.join(wanting)}: tls: true needs network.tls (certificate and private_key)")
        named = [f"peers.{n}" for n, p in self.peers.items() if p.certificate_names]
        if named and (self.network.tls is None or not self.network.tls.require_client_certificate):
            raise ValueError(
                f"{', '.join(named)}: certificate_names needs mutual TLS (network.tls with "
                "require_client_certificate: true), or no caller would present a certificate"
            )
        return self

    @property
    def weights_directory(self) -> Path:
        """Where model weights live unless a model names its own folder."""
        from_env = os.environ.get("TOTALSEG_WEIGHTS_PATH")
        return Path(from_env) if from_env else self.storage.directory / "weights"

    @property
    def jobs_directory(self) -> Path:
        """Per-job output folders (label maps, statistics, results)."""
        return self.storage.directory / "jobs"

    @property
    def database_url(self) -> str:
        """The configured database URL, or the SQLite file in the storage directory."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.storage.directory / 'dicom-node.db').resolve()}"


def _is_this_host(host: str, own_host: str) -> bool:
    """Whether ``host`` names this machine: a loopback name or address, an unspecified address (0.0.0.0 or ::,
    which the system calls as this machine), or the address the node listens on."""
    host = host.strip().lower()
    if host in ("localhost", "localhost.localdomain", own_host.strip().lower()):
        return True
    address, own = ip_address_of(host), ip_address_of(own_host.strip().lower())
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return address is not None and (address.is_loopback or address.is_unspecified or address == own)


def load_settings(path: Path | str | None = None) -> Settings:
    """Read and validate the configuration.

    Parameters
    ----------
    path
        YAML file; default ``$DICOM_NODE_CONFIG``, else ``config.yaml`` in the
        working directory if present, else built-in defaults and environment only.

    Raises
    ------
    ConfigError
        With one line per problem, each naming the key.
    """
    unknown = unknown_environment_variables()
    if unknown:
        raise ConfigError("configuration (DICOM_NODE_* environment):\n" + "\n".join(f"  {u}" for u in unknown))
    path = _resolve_config_path(path)
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(path)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, path)) from None
    except SettingsError as exc:  # an environment value pydantic-settings cannot even parse
        raise ConfigError(_describe_settings_error(exc)) from None
    if path is not None:
        _resolve_beside(settings, path.parent)
    return settings


def _resolve_beside(settings: Settings, folder: Path) -> None:
    """Make the relative paths of ``settings`` relative to ``folder`` (the config file's), not to the working
    directory (``/`` under systemd): the storage folder, models' weights folders and the TLS files."""

    def beside(value: Path) -> Path:
        return value if value.is_absolute() else (folder / value).resolve()

    settings.storage.directory = beside(settings.storage.directory)
    for model in settings.models.values():
        if isinstance(model, TotalSegmentatorModelSettings) and model.weights_directory is not None:
            model.weights_directory = beside(model.weights_directory)
    tls = settings.network.tls
    if tls is not None:
        tls.certificate, tls.private_key = beside(tls.certificate), beside(tls.private_key)
        tls.ca_certificates = beside(tls.ca_certificates) if tls.ca_certificates is not None else None
    settings.database.url = _sqlite_file_beside(settings.database.url, beside)
    web = settings.console
    web.tls_certificate = beside(web.tls_certificate) if web.tls_certificate is not None else None
    web.tls_private_key = beside(web.tls_private_key) if web.tls_private_key is not None else None


def _sqlite_file_beside(url: str | None, beside: Callable[[Path], Path]) -> str | None:
    """``url`` with a relative SQLite file path made absolute by ``beside``: otherwise ``serve``, ``worker`` and
    ``status`` started from different working directories would each open (and create) a database of their own."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url) if url else None
    except ArgumentError:
        return url
    if parsed is None or parsed.get_backend_name() != "sqlite" or parsed.query.get("uri"):
        return url
    database = Path(str(parsed.database or ""))
    if not str(database) or database.is_absolute():
        return url
    return parsed.set(database=str(beside(database))).render_as_string(hide_password=False)


def unknown_environment_variables() -> list[str]:
    """A sentence for each ``DICOM_NODE_*`` variable that names no setting (a typo pydantic would ignore)."""
    known = _env_names(Settings, ENV_PREFIX)
    problems = []
    for name in sorted(os.environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in OWN_ENV_VARIABLES:
            continue
        if _names_a_key(Settings, upper.removeprefix(ENV_PREFIX).lower().split(ENV_NESTED_DELIMITER)):
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(
            f"unknown environment variable {name}{hint}: it names no setting, so it would be ignored; "
            f"settings are DICOM_NODE_<SECTION>__<KEY>, with two underscores between levels"
        )
    return problems


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The sections (pydantic models) a field's type may hold: itself, or those in a union or optional."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) is dict:
        return []
    return [model for arg in get_args(annotation) for model in _models_in(arg)]


def _names_a_key(annotation: Any, parts: list[str]) -> bool:
    """Whether ``parts`` (lower case, one per level) is a path to a setting under a field of type ``annotation``."""
    if not parts:
        return True
    models = _models_in(annotation)
    if models:
        fields = [m.model_fields[parts[0]] for m in models if parts[0] in m.model_fields]
        return any(_names_a_key(f.annotation, parts[1:]) for f in fields)
    if get_origin(annotation) is dict:  # a name the configuration chooses (a destination, a peer...)
        return bool(parts[0]) and _names_a_key(get_args(annotation)[1], parts[1:])
    return False  # a value or a list: nothing below it


def _env_names(annotation: Any, prefix: str) -> list[str]:
    """Every environment variable naming a section or setting (not under a name the configuration chooses)."""
    names = []
    for model in _models_in(annotation):
        for field, info in model.model_fields.items():
            name = prefix + field.upper()
            names += [name, *_env_names(info.annotation, name + ENV_NESTED_DELIMITER)]
    return names


def _resolve_config_path(path: Path | str | None) -> Path | None:
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder, not a YAML file")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    from_env = os.environ.get(CONFIG_PATH_ENV)
    if from_env:
        return _resolve_config_path(from_env)
    default = Path("config.yaml")
    return default if default.is_file() else None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader that notes every key given twice in one mapping (in :attr:`repeated`, a sentence each
    naming the key's path and both lines), where PyYAML would keep the last silently: a ``destinations:`` block
    added at the top of the shipped file would replace, or be replaced by, the shipped one without a word."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.repeated: list[str] = []
        self._path: list[Any] = []  # what compose_node is composing: a key node, a list index, or None (a key)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._path.append(index)
        try:
            return super().compose_node(parent, index)
        finally:
            self._path.pop()

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node: yaml.MappingNode = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], yaml.Node] = {}
        for key, _value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue  # a merge (<<) overrides by design; a list or mapping as a key names no setting
            earlier = first.setdefault((key.tag, key.value), key)
            if earlier is not key:
                self.repeated.append(self._repeated(earlier, key))
        return node

    def _repeated(self, earlier: yaml.Node, later: yaml.Node) -> str:
        parents = [
            p if isinstance(p, int) else str(p.value) for p in self._path if isinstance(p, int | yaml.ScalarNode)
        ]
        loc = (*parents, str(later.value))
        key = ".".join(str(part) for part in loc)
        return (
            f"{key} is given twice, on lines {earlier.start_mark.line + 1} and {later.start_mark.line + 1}: YAML would "
            "keep only the later one and drop the other without a word; merge them into one  "
            f"[YAML key {key} or env {_env_name(loc)}]"
        )


def _load_yaml(text: str) -> tuple[Any, list[str]]:
    """The YAML document in ``text``, read as ``yaml.safe_load`` would, and a sentence for each key given twice in
    one mapping."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data(), loader.repeated
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not a UTF-8 text file (the byte at position {exc.start} is not UTF-8): "
            "save it as UTF-8 text"
        ) from None
    except OSError as exc:
        reason = (exc.strerror or "it cannot be read").lower()
        raise ConfigError(f"cannot read config file {path}: {reason}") from None
    try:
        data, repeated = _load_yaml(text)
    except yaml.YAMLError as exc:
        where = str(exc).replace('"<unicode string>"', f'"{path}"')
        raise ConfigError(f"{path}: not valid YAML: {where}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: it is nested too deeply") from None
    if repeated:
        raise ConfigError("\n".join([f"{path}: {len(repeated)} key(s) given twice", *(f"  {r}" for r in repeated)]))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return data


_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]*:)\S*@")
"""``scheme://user:password@``: the password runs to the last ``@`` of the URL, so it may hold ``@`` and ``/``
(what follows that ``@`` is hidden too where the path or query holds one: never too little)."""
_SECRET_IN_QUERY = re.compile(r"([?&][^=&\s]*(?:pass|secret|token|key|credential)[^=&\s]*=)[^&\s'\"]*", re.IGNORECASE)
"""A URL query parameter that may hold a secret (``password=``, ``sslpassword=``, ``sslkey=``...) and its value."""


def hide_url_password(url: str) -> str:
    """A whole URL (``database.url``) with its password and secret query values replaced by ``***``: the password
    is everything between ``user:`` and the URL's last ``@``, spaces included."""
    scheme, separator, rest = url.partition("://")
    at = rest.rfind("@")
    user, colon, _password = rest[: max(at, 0)].partition(":")
    if separator and at >= 0 and colon:
        url = f"{scheme}{separator}{user}:***{rest[at:]}"
    return hide_password(url)


def hide_password(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@host`` in it, and the value of any secret URL
    query parameter (``?password=``, ``&sslpassword=``...), replaced by ``***``."""
    return _SECRET_IN_QUERY.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1***@", text))


def _got(value: Any, limit: int = 80) -> str:
    """The value a setting had, for an error message: as Python writes it, password hidden, cut to ``limit``."""
    text = hide_password(repr(value))
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _is_secret(loc: tuple[int | str, ...]) -> bool:
    """Whether the key at ``loc`` holds a secret whose value no message may show."""
    names = [part for part in loc if isinstance(part, str)]
    a_user = len(names) == 3 and names[:2] == ["console", "users"]  # a user given as a string: the hash, perhaps
    return bool(names) and (names[-1] in SECRET_KEYS or names[-2:] == ["database", "url"] or a_user)


def _without_union_tag(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """``loc`` less the model kind pydantic puts after a model's name (``models.m.totalsegmentator.x``)."""
    if len(loc) > 3 and loc[0] == "models" and loc[2] in _MODEL_KINDS:
        return loc[:2] + loc[3:]
    return loc


def _env_name(loc: tuple[int | str, ...]) -> str:
    """The environment variable that sets the key at ``loc``: a list is set whole (as JSON), not item by item."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            break
        parts.append(part.upper())
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(parts)


def _plain_message(error: Any) -> str:
    """What is wrong with one setting, in words (never a Python class, a regular expression or a pydantic term)."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    name = str(next((p for p in reversed(error["loc"]) if isinstance(p, str)), ""))
    if kind == "path_type":
        return "must be a folder path" if "directory" in name else "must be a file path"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a section of settings"
    if kind == "list_type":
        return "must be a list"
    if kind == "string_pattern_mismatch":
        if ctx.get("pattern") == AE_TITLE_PATTERN:
            return "may hold only printable ASCII characters other than backslash, at most 16"
        return "does not have the form this setting needs"
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    if kind == "missing":
        return "is required but missing"
    if kind == "union_tag_not_found":
        discriminator = str(ctx.get("discriminator", "kind")).strip("'")
        return f"needs a {discriminator} key that says which kind it is"
    if kind == "union_tag_invalid":
        discriminator = str(ctx.get("discriminator", "kind")).strip("'")
        return f"{discriminator} {ctx.get('tag')!r} is not one of {ctx.get('expected_tags')}"
    if kind == "is_instance_of":
        return "has the wrong kind of value"
    if kind == "less_than_equal" and name.endswith("_seconds") and ctx.get("le") == DAY_SECONDS:
        return f"must be at most {DAY_SECONDS} seconds (one day): a longer wait would overflow the clock it is given to"
    if kind == "less_than_equal" and name.endswith("days") and ctx.get("le") == MAX_DAYS:
        return f"must be at most {MAX_DAYS} days (a hundred years)"
    if kind == "greater_than_equal" and name.endswith("_seconds") and ctx.get("ge") == 1:
        return "must be at least 1 second: a shorter period would keep the node checking without pause"
    message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if "<class" in message or "instance of" in message:  # a pydantic message that names a Python class
        return "has the wrong kind of value"
    return message


def _describe_validation_error(exc: ValidationError, path: Path | None) -> str:
    source = f"{path} (and DICOM_NODE_* environment)" if path else "configuration (DICOM_NODE_* environment)"
    lines = [f"{source}: {exc.error_count()} invalid setting(s)"]
    for error in exc.errors(include_url=False):
        loc = _without_union_tag(tuple(error["loc"]))
        message = _plain_message(error)
        got = error.get("input")
        shows_value = error["type"] != "missing" and not isinstance(got, dict) and bool(loc)
        detail = f" (got {_got(got)})" if shows_value else ""
        if shows_value and _is_secret(loc):
            detail = " (its value is not shown: it is a secret)"
        if not loc:  # a check across sections: its message names the keys
            lines.append(f"  {message}")
            continue
        key = ".".join(str(part) for part in loc)
        joined = " " if message.split(" ", 1)[0] in ("must", "may", "is", "needs") else ": "
        lines.append(f"  {key}{joined}{message}{detail}  [YAML key {key} or env {_env_name(loc)}]")
    return "\n".join(lines)


def _describe_settings_error(exc: SettingsError) -> str:
    """An environment value pydantic-settings could not parse (a list or mapping that is not JSON), in words."""
    field = re.search(r'field "([^"]+)"', str(exc))
    if field is None:
        return "an environment variable DICOM_NODE_* is not valid: lists and mappings must be JSON"
    prefix = ENV_PREFIX + field.group(1).upper()
    names = sorted(n for n in os.environ if n.upper() == prefix or n.upper().startswith(prefix + ENV_NESTED_DELIMITER))
    named = " or ".join(names) if names else prefix
    return (
        f"the environment variable {named} is not valid JSON "
        '(lists and mappings in the environment must be JSON, e.g. ["PACS", "CT01"] or {"port": 104})'
    )


def dump_settings(settings: Settings) -> str:
    """The effective configuration as YAML."""
    return yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)
