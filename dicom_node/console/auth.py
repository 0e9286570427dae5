"""Who is asking: local users with argon2 passwords or a reverse proxy's header; signed sessions; CSRF; roles.

A session is a signed cookie (HMAC-SHA256 over its JSON: user, role, a random session id and
its expiry), so any number of console processes can check it without shared state. The CSRF
token of a session is an HMAC of its session id: every POST carries it, in the form field
``csrf_token`` or the header ``X-CSRF-Token``. Behind a single sign-on proxy the console opens
such a session itself, on the first request of a browser or client that has none: its token
is as short-lived and as bound to one client as a password login's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from dicom_node.config import ConsoleRole, ConsoleSettings
from dicom_node.logs import log_event, os_error_text

LOG = logging.getLogger(__name__)
SESSION_COOKIE = "dicom_node_session"
LOGIN_COOKIE = "dicom_node_login"
LOGIN_FORM_SECONDS = 600
"""A login form must be sent within this long of being shown."""
PROXY_CREDENTIAL = "proxy_header"
"""What a session the console opened for a user the reverse proxy named keeps instead of a password signature:
no password login accepts it, and no proxy user accepts a password login's session."""
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
ROLE_RANK: dict[str, int] = {"viewer": 1, "operator": 2}

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash("not a password anyone has")


def _bytes(text: str) -> bytes:
    """``text`` as bytes for signing and comparing: any character a client sends (also a lone surrogate)."""
    return text.encode("utf-8", "surrogatepass")


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison of a client's token with the expected one, whatever characters it holds."""
    return hmac.compare_digest(_bytes(given), _bytes(expected))


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` for ``console.users.NAME.password_hash``."""
    return _hasher.hash(password)


def check_password(password_hash: str, password: str) -> bool:
    """Whether ``password`` matches ``password_hash``; never raises for a wrong or malformed hash."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True)
class User:
    """A logged-in console user."""

    name: str
    role: ConsoleRole
    session_id: str
    credential: str = ""  # a signature of the password hash the session was opened with (local users)
    expires: float = 0.0  # when the session's cookie runs out by its own say (seconds since the epoch)

    def has_role(self, role: str) -> bool:
        """Operators may do everything viewers may."""
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


class Sessions:
    """Signs and checks session cookies and CSRF tokens with one secret key."""

    def __init__(self, secret: bytes, lifetime_seconds: float, ended_file: Path | None = None) -> None:
        self._secret = secret
        self.lifetime_seconds = lifetime_seconds
        self._ended_file = ended_file  # logged-out sessions, kept across restarts of serve
        self._ended: dict[str, float] = _read_ended(ended_file)  # session id -> when its cookie expires anyway
        self._ended_lock = threading.Lock()

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self._secret, payload, hashlib.sha256).hexdigest()

    def issue(self, name: str, role: ConsoleRole, password_hash: str = "") -> tuple[User, str]:
        """A new session for ``name``: the user and the cookie value. The session holds :meth:`credential` of
        ``password_hash``, so it ends when the user's password is changed."""
        return self._issue(name, role, self.credential(password_hash))

    def _issue(self, name: str, role: ConsoleRole, credential: str) -> tuple[User, str]:
        expires = time.time() + self.lifetime_seconds
        user = User(name, role, secrets.token_urlsafe(18), credential, expires)
        body = json.dumps({"u": name, "r": role, "s": user.session_id, "e": expires, "p": user.credential})
        payload = base64.urlsafe_b64encode(body.encode()).decode()
        return user, f"{payload}.{self._sign(payload.encode())}"

    def read(self, cookie: str | None) -> User | None:
        """The user of a cookie, or None when it is missing, forged or expired."""
        if not cookie or "." not in cookie:
            return None
        payload, signature = cookie.rsplit(".", 1)
        if not _same(signature, self._sign(_bytes(payload))):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(_bytes(payload)))
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("r") not in ROLE_RANK:
            return None
        try:
            expires = float(data.get("e", 0))
        except (TypeError, ValueError):
            return None
        if expires < time.time() or self.ended(str(data.get("s"))):
            return None
        return User(str(data["u"]), data["r"], str(data["s"]), str(data.get("p", "")), expires)

    def credential(self, password_hash: str) -> str:
        """What a session keeps of the password hash it was opened with (a signature: it reveals nothing)."""
        return self._sign(_bytes(f"password:{password_hash}"))[:24] if password_hash else ""

    def opened_with(self, user: User, password_hash: str) -> bool:
        """Whether ``user``'s session was opened with the password whose hash is ``password_hash`` now."""
        return _same(user.credential, self.credential(password_hash))

    def end(self, user: User) -> None:
        """Log ``user``'s session out on the server: its cookie is refused from now on, even if kept.

        The session is remembered as ended until its cookie runs out by its own expiry, or a lifetime from now if
        that is later, and a lifetime more: a clock stepped back between the login and the logout (or after the
        entry is dropped) must not let a kept copy of the cookie outlive the entry that refuses it."""
        now = time.time()
        with self._ended_lock:
            for session_id in [s for s, until in self._ended.items() if until < now]:
                del self._ended[session_id]  # expired cookies are refused anyway
            self._ended[user.session_id] = max(user.expires, now + self.lifetime_seconds) + self.lifetime_seconds
            if self._ended_file is not None:
                try:
                    _write_ended(self._ended_file, self._ended)
                except OSError as exc:  # the logout still holds until serve restarts
                    log_event(
                        LOG,
                        logging.WARNING,
                        "console.logout_not_kept",
                        reason=f"the list of ended sessions could not be saved ({os_error_text(exc)}); the logout "
                        "holds until the console restarts",
                    )

    def ended(self, session_id: str) -> bool:
        with self._ended_lock:
            return session_id in self._ended

    def proxy_user(self, name: str, role: ConsoleRole, cookie: str | None) -> tuple[User, str | None]:
        """A user named by the reverse proxy, with ``role`` (the proxy's say, on every request): in the session of
        ``cookie`` when that is a live session the console opened for ``name``; else in a new one, whose cookie
        value comes back second (None: the cookie's session goes on)."""
        session = self.read(cookie)
        if session is not None and session.name == name and session.credential == PROXY_CREDENTIAL:
            return User(name, role, session.session_id, PROXY_CREDENTIAL, session.expires), None
        return self._issue(name, role, PROXY_CREDENTIAL)

    @staticmethod
    def login_nonce() -> str:
        """A login form's nonce: when the form was shown, and a random part."""
        return f"{int(time.time())}.{secrets.token_urlsafe(18)}"

    def login_token(self, nonce: str) -> str:
        """The login form's token: binds the form to the browser that loaded it (its login cookie)."""
        return self._sign(_bytes(f"login:{nonce}"))

    def login_token_valid(self, nonce: str | None, token: str | None) -> bool:
        """Whether the form's token matches its nonce, and the form was shown within ``LOGIN_FORM_SECONDS``
        (checked here, not only by the cookie's lifetime in the browser)."""
        if not nonce or not token or not _same(str(token), self.login_token(str(nonce))):
            return False
        shown = str(nonce).split(".", 1)[0]
        return shown.isdigit() and 0 <= time.time() - int(shown) <= LOGIN_FORM_SECONDS

    def notice_signature(self, text: str) -> str:
        """Signs an outcome message put in a redirect's address, so a crafted link cannot show its own text."""
        return self._sign(_bytes(f"notice:{text}"))

    def notice_valid(self, text: str, signature: str | None) -> bool:
        return bool(signature) and _same(str(signature), self.notice_signature(text))

    def csrf_token(self, user: User) -> str:
        return self._sign(_bytes(f"csrf:{user.session_id}"))

    def csrf_valid(self, user: User, token: str | None) -> bool:
        return bool(token) and _same(str(token), self.csrf_token(user))


def _read_ended(path: Path | None) -> dict[str, float]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    now = time.time()
    if not isinstance(data, dict):
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float)) and v > now}


def _write_ended(path: Path, ended: dict[str, float]) -> None:
    """Replace the file of logged-out sessions in one step (0600: it names session ids)."""
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(ended, file)
    os.replace(partial, path)


SESSION_KEY_CHARACTERS = 64
"""The kept key: 32 random bytes as hex. A file holding less (cut short by a crash or a full disk) is made anew."""


def session_secret(settings: ConsoleSettings, storage: Path) -> bytes:
    """``console.session_secret``, else a random key kept in ``<storage>/console-secret`` (made once, 0600).

    The key is written whole to a spare file and then put in place, so a stop half-way never leaves a short key;
    a kept file that is empty or short (an older node stopped while writing it) is replaced, with a log line: an
    empty key would let anyone sign the console's forms and notices.
    """
    if settings.session_secret:
        return settings.session_secret.encode()
    path = storage / "console-secret"
    storage.mkdir(parents=True, exist_ok=True)
    try:
        kept = path.read_bytes().strip()
    except FileNotFoundError:
        kept = None
    if kept is not None and len(kept) >= SESSION_KEY_CHARACTERS:
        return kept
    if kept is not None:
        log_event(
            LOG,
            logging.WARNING,
            "console.session_key_replaced",
            path=str(path),
            reason=f"the console's session key in {path} was {'empty' if not kept else 'cut short'}; a new key "
            "was made, so everyone logged in must log in again",
        )
    return _new_session_key(path, replace=kept is not None)


def _new_session_key(path: Path, *, replace: bool) -> bytes:
    """A new random key, fsynced in a spare file, then linked in as ``path`` (0600): over a damaged one where
    ``replace``, else only where none is there yet (two processes starting at once keep the first one's)."""
    key = secrets.token_hex(SESSION_KEY_CHARACTERS // 2).encode()
    spare = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(key)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(spare, path)
        else:
            try:
                os.link(spare, path)
            except FileExistsError:
                return path.read_bytes().strip()
    finally:
        spare.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return key


def local_login(settings: ConsoleSettings, name: str, password: str) -> ConsoleRole | None:
    """The role of a local user whose password matches; None otherwise (same work for unknown names)."""
    user = settings.users.get(name)
    if user is None:
        check_password(_DUMMY_HASH, password)
        return None
    return user.role if check_password(user.password_hash, password) else None


def from_trusted_proxy(settings: ConsoleSettings, address: str | None) -> bool:
    """Whether a request came from an address in ``console.trusted_proxies``."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(network, strict=False) for network in settings.trusted_proxies)


def forwarded_client(settings: ConsoleSettings, forwarded_for: list[str]) -> str | None:
    """The client a trusted proxy names in ``X-Forwarded-For`` (the values of every such header, in order): the
    right-most address that is not itself one of ``console.trusted_proxies`` (each proxy appends the address it
    was called from, so entries left of it may be anything a client sent). None when there is no such header, or
    an entry that is no IP address stands before it."""
    entries = [entry.strip() for value in forwarded_for for entry in value.split(",")]
    client = None
    for entry in reversed([e for e in entries if e]):
        try:
            client = str(ipaddress.ip_address(entry))
        except ValueError:
            return None
        if not from_trusted_proxy(settings, client):
            return client
    return client  # every entry a trusted proxy: the client runs where a proxy does


def forwarded_scheme(forwarded_proto: str | None, forwarded: str | None) -> str | None:
    """The scheme the browser used, as a reverse proxy names it: the first value of ``X-Forwarded-Proto``, else the
    ``proto`` of the first element of ``Forwarded`` (RFC 7239); in lower case. None when neither names one."""
    if forwarded_proto and forwarded_proto.split(",")[0].strip():
        return forwarded_proto.split(",")[0].strip().lower()
    for pair in (forwarded or "").split(",")[0].split(";"):
        name, _, value = pair.partition("=")
        if name.strip().lower() == "proto" and value.strip().strip('"'):
            return value.strip().strip('"').lower()
    return None


class LoginThrottle:
    """Failed logins per address and per user name: after ``limit`` in a minute, that address, or anyone
    logging in as that name, must wait.

    An IPv6 client counts by its /64 network (one host can use a whole /64), and addresses and names whose
    failures are older than the window are forgotten, so rotating addresses neither escapes the limit within
    a network nor grows this table without bound. A name guessed from many addresses is throttled by its own
    count; it waits out the same window, so nobody can lock a user out for longer than guessing goes on. A
    successful login takes back only its own attempt, never failures counted before it.
    """

    WINDOW_SECONDS = 60.0
    PRUNE_ABOVE = 1000

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._failures: dict[str, deque[float]] = {}  # by address (or IPv6 /64)
        self._by_name: dict[str, deque[float]] = {}  # by a digest of the user name sent
        self._lock = threading.Lock()

    @staticmethod
    def key(address: str) -> str:
        """What failures are counted by: the IPv4 address, or the IPv6 address' /64 network."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        if ip.version == 6 and ip.ipv4_mapped is None:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)

    @staticmethod
    def name_key(name: str) -> str:
        """What a user name's failures are counted by: a digest, so a long name sent costs no memory."""
        return hashlib.sha256(_bytes(name)).hexdigest()

    def wait_seconds(self, address: str, name: str | None = None) -> int:
        """Seconds ``address`` (or anyone, for user ``name``) must wait before the next attempt (0: try now)."""
        now = time.monotonic()
        with self._lock:
            by_name = self._wait(self._by_name, self.name_key(name), now) if name is not None else 0
            return max(self._wait(self._failures, self.key(address), now), by_name)

    def _wait(self, table: dict[str, deque[float]], key: str, now: float) -> int:
        failures = table.get(key)
        if not failures:
            return 0
        while failures and now - failures[0] > self.WINDOW_SECONDS:
            failures.popleft()
        if len(failures) < self.limit:
            return 0
        return max(1, int(self.WINDOW_SECONDS - (now - failures[0])) + 1)

    def begin(self, address: str, name: str) -> tuple[int, str]:
        """Start a login attempt from ``address`` as user ``name``: the seconds it must wait first (0: go ahead)
        and what is throttled (``"address"`` or ``"name"``; ``""`` when it may go ahead).

        An attempt let through counts as a failure of both at once, in the same locked step as the check, and
        :meth:`succeeded` takes it back: logins sent in parallel cannot all pass the check before any fails.
        """
        now = time.monotonic()
        address_key, name_key = self.key(address), self.name_key(name)
        with self._lock:
            by_address = self._wait(self._failures, address_key, now)
            by_name = self._wait(self._by_name, name_key, now)
            if by_address or by_name:
                return max(by_address, by_name), "address" if by_address >= by_name else "name"
            self._record(self._failures, address_key, now)
            self._record(self._by_name, name_key, now)
            return 0, ""

    def failed(self, address: str, name: str | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            self._record(self._failures, self.key(address), now)
            if name is not None:
                self._record(self._by_name, self.name_key(name), now)

    def _record(self, table: dict[str, deque[float]], key: str, now: float) -> None:
        if len(table) > self.PRUNE_ABOVE:
            for stale in [k for k, v in table.items() if not v or now - v[-1] > self.WINDOW_SECONDS]:
                del table[stale]
        table.setdefault(key, deque()).append(now)

    def succeeded(self, address: str, name: str) -> None:
        """Take back the attempt :meth:`begin` counted for a login that succeeded; earlier failures stay."""
        with self._lock:
            for table, key in ((self._failures, self.key(address)), (self._by_name, self.name_key(name))):
                failures = table.get(key)
                if failures:
                    failures.pop()
                if not failures:
                    table.pop(key, None)
