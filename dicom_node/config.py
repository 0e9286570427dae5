"""The node's configuration: one pydantic model tree, read from YAML and environment.

Precedence, highest first: environment variables (``DICOM_NODE_`` prefix, ``__``
between nested keys, e.g. ``DICOM_NODE_NETWORK__PORT=11112``), the YAML file,
the defaults below. Lists and mappings in environment variables are JSON.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
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


class TlsSettings(_Strict):
    """DICOM TLS: the listening port speaks TLS only; the same files serve associations the node opens."""

    certificate: Path = Field(description="The node's certificate (PEM), with any intermediate certificates.")
    private_key: Path = Field(description="The certificate's private key (PEM, unencrypted; keep it 0600).")
    ca_certificates: Path | None = Field(
        None, description="CA bundle (PEM) that peers' certificates must chain to; default: the system's."
    )
    require_client_certificate: bool = Field(
        False, description="Mutual TLS: callers must present a certificate signed by ca_certificates."
    )
    minimum_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    check_hostname: bool = Field(
        True, description="When calling a peer, its certificate must name the host (or IP) configured for it."
    )


class NetworkSettings(_Strict):
    """Where the node listens, and the limits every caller meets before and after association."""

    ae_title: AETitle = "DICOMNODE"
    host: str = "0.0.0.0"
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
    association_request_timeout_seconds: float = Field(
        10.0, gt=0, description="A new connection must complete its A-ASSOCIATE-RQ within this long."
    )
    pdu_read_timeout_seconds: float = Field(
        30.0, gt=0, description="Once a PDU starts, all of it must arrive within this long."
    )
    network_timeout_seconds: float = Field(60.0, gt=0)
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
    host: str | None = Field(None, description="Where the peer listens, for C-MOVE to it.")
    port: int | None = Field(None, ge=1, le=65535)

    @field_validator("hosts")
    @classmethod
    def _networks(cls, hosts: list[str]) -> list[str]:
        import ipaddress

        if not hosts:
            raise ValueError("give at least one address or network")
        for host in hosts:
            try:
                ipaddress.ip_network(host.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address or CIDR network (e.g. 10.1.0.0/16)") from None
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
        description="A job whose processing found the disk full is queued again and tried after this many seconds.",
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


class DatabaseSettings(_Strict):
    url: str | None = Field(None, description="SQLAlchemy URL; default is a SQLite file in the storage directory.")
    busy_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="How long a write waits for another process' lock on the SQLite file before it retries "
        "(the worker) or answers the C-STORE with 0xA700 (the receiver).",
    )


class CompletionSettings(_Strict):
    """When a series counts as complete."""

    quiet_seconds: float = Field(
        30.0,
        gt=0,
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
        description=(
            "While fewer images than the series' ImagesInAcquisition have arrived, the quiet period "
            "does not complete it; this longer silence does, and the job gets a 'partial series' warning."
        ),
    )


class AdmissionSettings(_Strict):
    """Header checks between COMPLETE and QUEUED: what is refused before any inference time is spent."""

    max_instances: int = Field(
        5000, ge=1, description="A series with more images (frames) than this is refused before its headers are read."
    )
    max_memory_gigabytes: float = Field(
        32.0,
        gt=0,
        description="Refuse a series whose estimated processing memory (every stage) exceeds this; about half "
        "the machine's memory. 32 GB admits 512 x 512 images up to about 5000 slices.",
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
    host: str
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
    first_retry_seconds: float = Field(10.0, gt=0, description="Wait before the 2nd attempt; doubles each time.")
    max_retry_seconds: float = Field(600.0, gt=0)
    timeout_seconds: float = Field(
        30.0, gt=0, description="Association timeout, and the DIMSE timeout of an empty object."
    )
    seconds_per_megabyte: float = Field(
        1.0, ge=0, description="Added to a C-STORE's DIMSE timeout per MB of the object sent (0: fixed timeout)."
    )
    parallel_sends: int = Field(
        4, ge=1, le=64, description="Destinations sent to at once; each destination gets one association at a time."
    )
    check_interval_seconds: float = Field(1.0, gt=0, le=60)
    unreachable_hours: float = Field(
        24.0,
        gt=0,
        description="A destination that cannot be reached (down, not answering) is tried again, every "
        "max_retry_seconds at most, for this long before its jobs fail; such tries do not use up max_attempts.",
    )


class RetentionSettings(_Strict):
    """Purging received images and results of finished series (DONE, FAILED, IGNORED) only.

    Everything off by default: nothing is deleted until an age or a disk budget is set.
    """

    days: float | None = Field(
        None, gt=0, description="Purge a finished series' images (and results) this many days after it finished."
    )
    results_days: float | None = Field(
        None, gt=0, description="Keep results (job folder, SEG/SR/RTSTRUCT) this long instead; default: as `days`."
    )
    max_disk_gigabytes: float | None = Field(
        None, gt=0, description="Budget for images plus results; over it, the oldest finished series go first."
    )
    quarantine_days: float | None = Field(
        None,
        gt=0,
        description="Delete refused instances (quarantine/ files and their rows) this many days after arrival.",
    )
    check_interval_seconds: float = Field(600.0, gt=0, description="How often `serve` applies retention.")

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
    series_description: str | None = Field(None, description="Python regex, searched (re.search).")
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
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


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
    shutdown_grace_seconds: float = Field(
        25.0,
        ge=0,
        le=3600,
        description="On SIGTERM a worker finishes its job for this long, then hands it back (queued again, not a death).",
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
    host: str = Field("127.0.0.1", description="Address the console listens on; loopback by default.")
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
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the console answers to (the Host header: console.hospital.example, *.example.org); "
        "empty: any. Stops DNS rebinding, where another site's page makes a browser send it requests.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description="Addresses or networks the proxy connects from; headers from anyone else are refused.",
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
    metrics_host: str = Field("127.0.0.1", description="Address of the separate metrics listener.")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="A separate listener for /metrics, /healthz and /readyz without login."
    )
    metrics_window_jobs: int = Field(
        10000, ge=1, description="Stage-duration and latency histograms cover this many most recent jobs."
    )
    echo_interval_seconds: float = Field(
        300.0, ge=0, description="C-ECHO every destination this often for the destinations page; 0: never."
    )
    refresh_seconds: float = Field(3.0, gt=0, le=600, description="How often the worklist refreshes itself.")

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, hosts: list[str]) -> list[str]:
        import ipaddress

        for host in hosts:
            try:
                ipaddress.ip_network(host.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address or CIDR network") from None
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
    if path is not None and not settings.storage.directory.is_absolute():
        # Relative storage paths are relative to the config file, not to the cwd.
        settings.storage.directory = (path.parent / settings.storage.directory).resolve()
    if path is not None:
        for model in settings.models.values():
            if not isinstance(model, TotalSegmentatorModelSettings) or model.weights_directory is None:
                continue
            if not model.weights_directory.is_absolute():
                # A model's own weights folder too: relative to the config file, like storage.directory.
                model.weights_directory = (path.parent / model.weights_directory).resolve()
    return settings


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
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = str(exc).replace('"<unicode string>"', f'"{path}"')
        raise ConfigError(f"{path}: not valid YAML: {where}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: it is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return data


_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def hide_password(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@host`` in it replaced by ``***``."""
    return _PASSWORD_IN_URL.sub(r"\1***@", text)


def _got(value: Any, limit: int = 80) -> str:
    """The value a setting had, for an error message: as Python writes it, password hidden, cut to ``limit``."""
    text = hide_password(repr(value))
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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
    message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if "<class" in message or "instance of" in message:  # a pydantic message that names a Python class
        return "has the wrong kind of value"
    return message


def _describe_validation_error(exc: ValidationError, path: Path | None) -> str:
    source = f"{path} (and DICOM_NODE_* environment)" if path else "configuration (DICOM_NODE_* environment)"
    lines = [f"{source}: {exc.error_count()} invalid setting(s)"]
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        message = _plain_message(error)
        got = error.get("input")
        shows_value = error["type"] != "missing" and not isinstance(got, dict) and bool(loc)
        detail = f" (got {_got(got)})" if shows_value else ""
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
