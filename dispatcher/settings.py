"""Settings: one frozen dataclass read from ``DISPATCHER_*`` environment variables.

Every setting has a default that points at the local stack (``make stack``), so a bare
``dispatcher run`` works on a developer machine. A bad value stops the process at start
with one line naming the variable::

    >>> Settings.from_env({"DISPATCHER_MAX_RETRIES": "-1"})
    Traceback (most recent call last):
    ...
    dispatcher.settings.SettingsError: DISPATCHER_MAX_RETRIES: expected an integer >= 0, got '-1'
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dispatcher.errors import ConfigurationError

PREFIX = "DISPATCHER_"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(ConfigurationError, ValueError):
    """A DISPATCHER_* variable has a value the daemon cannot use; fix the one the message names."""


# --- parsers: each takes the raw string and returns the value or raises ValueError ------


def _str(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _optional_str(raw: str) -> str:
    return raw.strip()


def _port(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"expected an integer from 1 to 65535, got {raw!r}") from None
    if not 1 <= value <= 65535:
        raise ValueError(f"expected an integer from 1 to 65535, got {raw!r}")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"expected an integer >= {minimum}, got {raw!r}") from None
        if value < minimum:
            raise ValueError(f"expected an integer >= {minimum}, got {raw!r}")
        return value

    return parse


def _seconds(*, allow_zero: bool = False) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"expected a number of seconds, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number of seconds, got {raw!r}")
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"expected a number of seconds {bound}, got {raw!r}")
        return value

    return parse


def _fraction(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"expected a fraction above 0 and at most 1, got {raw!r}") from None
    if not 0 < value <= 1:  # also refuses nan
        raise ValueError(f"expected a fraction above 0 and at most 1, got {raw!r}")
    return value


def _topics(raw: str) -> tuple[str, ...]:
    topics = tuple(t.strip() for t in raw.split(",") if t.strip())
    if not topics:
        raise ValueError("expected a comma-separated list of topic names, got nothing")
    for topic in topics:
        if len(topic) > 249 or not all(c.isalnum() or c in "._-" for c in topic):
            raise ValueError(f"{topic!r} is not a valid Kafka topic name")
    return topics


def _topic(raw: str) -> str:
    topics = _topics(raw)
    if len(topics) != 1:
        raise ValueError(f"expected one topic name, got {raw!r}")
    return topics[0]


def _networks(raw: str) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{part!r} is not a CIDR such as 127.0.0.0/8 or ::1/128") from None
    return tuple(networks)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


def _hours(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"expected a number of hours, got {raw!r}") from None
    if not 0 <= value < 1e6:  # also refuses nan and inf
        raise ValueError(f"expected 0 or more hours, got {raw!r}")
    return value


def _log_level(raw: str) -> str:
    return _choice("debug", "info", "warning", "error")(raw).upper()


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false (also 1/0, yes/no, on/off), got {raw!r}")


MAX_PROCESSES = 128  # DISPATCHER_PROCESSES above this is a typo, not a machine


def available_cpus(
    *, affinity: int | None, cpu_count: int | None, cpu_max: str | None = None
) -> int:
    """The CPUs this process may use: those it may run on (``sched_getaffinity``, else
    ``os.cpu_count()``), capped by a cgroup v2 CPU quota (``cpu.max``: "max 100000", or
    "<quota> <period>", a Kubernetes CPU limit), rounded up; 1 at least.

    >>> available_cpus(affinity=8, cpu_count=64)
    8
    >>> available_cpus(affinity=8, cpu_count=8, cpu_max="250000 100000")
    3
    >>> available_cpus(affinity=None, cpu_count=4, cpu_max="max 100000")
    4
    """
    cpus = affinity or cpu_count or 1
    parts = (cpu_max or "").split()
    if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit() and int(parts[1]) > 0:
        cpus = min(cpus, -(-int(parts[0]) // int(parts[1])))
    return max(1, cpus)


def _cpus_here() -> int:
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = None
    try:
        with open("/sys/fs/cgroup/cpu.max") as file:  # cgroup v2; absent elsewhere
            cpu_max: str | None = file.read()
    except OSError:
        cpu_max = None
    return available_cpus(affinity=affinity, cpu_count=os.cpu_count(), cpu_max=cpu_max)


def parse_processes(raw: str, *, cpus: Callable[[], int] = _cpus_here) -> int:
    """A number of processes from 1 to :data:`MAX_PROCESSES`, or ``auto``: ``cpus()``.

    >>> parse_processes("3"), parse_processes("auto", cpus=lambda: 2)
    (3, 2)
    """
    value = raw.strip().lower()
    if value == "auto":
        return min(cpus(), MAX_PROCESSES)
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_PROCESSES:
        raise ValueError(f"expected auto or an integer from 1 to {MAX_PROCESSES}, got {raw!r}")
    return number


def _database_url(raw: str) -> str:
    value = _str(raw)
    if not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("expected a postgresql:// URL")
    return value


def _setting(default: Any, parse: Callable[[str], Any], doc: str, *, secret: bool = False) -> Any:
    return field(
        default=default,
        repr=not secret,
        metadata={"parse": parse, "doc": doc, "secret": secret},
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The daemon's configuration. Build it with :meth:`from_env`."""

    kafka_bootstrap: str = _setting(
        "127.0.0.1:9092",
        _str,
        "Kafka bootstrap servers, comma-separated host:port; on a cluster list several "
        "brokers: clients ask them again when no broker they know answers.",
    )
    kafka_metadata_max_age_ms: int = _setting(
        30_000,
        _int_at_least(1000),
        "Longest time a Kafka client keeps its cluster metadata (brokers, partition "
        "leaders) without asking again; an error makes it ask at once.",
    )
    kafka_request_timeout_ms: int = _setting(
        15_000,
        _int_at_least(10_001),
        "Longest wait for one Kafka request or connection; above 10000 (the consumers' "
        "session timeout, which bounds a group join).",
    )
    database_url: str = _setting(
        "postgresql://dispatcher@127.0.0.1:55432/dispatcher",
        _database_url,
        "PostgreSQL URL of the subscriptions store.",
        secret=True,
    )
    http_host: str = _setting("127.0.0.1", _str, "Address the HTTP API listens on.")
    http_port: int = _setting(8080, _port, "Port of the HTTP API (webhooks, health).")
    processes: int = _setting(
        1,
        parse_processes,
        "Consumer processes of `dispatcher run`, in the same consumer groups, under one "
        "supervisor serving the one HTTP port: a number, or auto (the CPUs it may use); "
        "1: no supervisor. Overridden by `dispatcher run --processes`.",
    )
    process_unhealthy_seconds: float = _setting(
        30.0,
        _seconds(allow_zero=True),
        "With more than one process: a child whose /healthz fails this long (after it "
        "first passed) is restarted, killed at once if it does not answer at all; 0: never.",
    )
    portal_session_hours: int = _setting(
        12,
        _int_at_least(1),
        "How long a sign-in to the integrators' portal (/portal/) lasts, in hours; signing "
        "out or revoking the token ends it sooner.",
    )
    portal_trust_proxy: bool = _setting(
        False,
        _bool,
        "true: the portal believes X-Forwarded-Proto and X-Forwarded-Host (set it only behind "
        "a reverse proxy that sets them), for its Secure cookie and its same-origin checks.",
    )
    smtp_host: str = _setting("127.0.0.1", _str, "SMTP server for failure notices.")
    smtp_port: int = _setting(2525, _port, "SMTP server port.")
    smtp_user: str = _setting("", _optional_str, "SMTP user name; empty for no login.")
    smtp_password: str = _setting("", _optional_str, "SMTP password; never logged.", secret=True)
    smtp_tls: str = _setting(
        "none",
        _choice("none", "starttls", "tls"),
        "SMTP transport security: none, starttls or tls (implicit TLS).",
    )
    smtp_sender: str = _setting("webhooks@localhost", _str, "From address of failure notices.")
    smtp_connections: int = _setting(
        4,
        _int_at_least(1),
        "SMTP connections kept open for failure notices, each reused for many mails.",
    )
    event_topics: tuple[str, ...] = _setting(
        ("entity-events",), _topics, "Kafka topics of entity-change events, comma-separated."
    )
    consumer_group: str = _setting(
        "webhook-dispatcher", _str, "Kafka consumer group shared by all dispatchers."
    )
    dead_letter_topic: str = _setting(
        "webhook-dead-letters", _topic, "Topic that receives malformed events, with the reason."
    )
    skip_undecodable_batches: bool = _setting(
        False,
        _bool,
        "true: skip a Kafka record batch that cannot be decoded (offsets logged, records "
        "lost); false: its partition waits at it and /readyz fails.",
    )
    retry_topic: str = _setting("webhook-retries", _topic, "Delay topic holding scheduled retries.")
    attempt_topic: str = _setting(
        "webhook-attempts", _topic, "Topic carrying attempt records to the delivery history."
    )
    attempt_log: bool = _setting(
        True, _bool, "on/off: record every attempt in the delivery history (PostgreSQL)."
    )
    attempt_retention_days: int = _setting(
        30, _int_at_least(1), "Days of delivery history kept (whole daily partitions dropped)."
    )
    recovery_max_days: int = _setting(
        14, _int_at_least(1), "Longest time range of one recovery job (POST /recover), in days."
    )
    disable_after_hours: float = _setting(
        120.0,
        _hours,
        "A webhook whose attempts all failed for this long (10 at least) is disabled; 0: never.",
    )
    notice_topic: str = _setting(
        "webhook-notices", _topic, "Topic queueing failure notices until they are mailed."
    )
    notice_digest_seconds: float = _setting(
        0.0,
        _seconds(allow_zero=True),
        "0: one mail per failed attempt; N: one digest mail per webhook per N seconds.",
    )
    retry_delay_seconds: float = _setting(
        900.0, _seconds(), "Delay between a failed attempt and the next one."
    )
    max_retries: int = _setting(3, _int_at_least(0), "Retries after the first attempt.")
    delivery_timeout_seconds: float = _setting(
        10.0, _seconds(), "Total time allowed for one webhook POST."
    )
    max_in_flight: int = _setting(
        256, _int_at_least(1), "Deliveries in flight at once, over all endpoints."
    )
    max_in_flight_per_endpoint: int = _setting(
        8,
        _int_at_least(1),
        "Most deliveries in flight at once to one endpoint (scheme+host+port): its adaptive "
        "limit starts here, halves on timeouts and 429/503 answers, grows back on fast ones.",
    )
    min_in_flight_per_endpoint: int = _setting(
        2,
        _int_at_least(1),
        "Lowest an endpoint's adaptive limit goes (capped by the maximum above).",
    )
    webhook_share_of_endpoint: float = _setting(
        0.25,
        _fraction,
        "Most of its endpoint's limit one webhook may hold while others wait (a fraction; "
        "1 slot at least); a fast webhook borrows free slots past it.",
    )
    allow_private_targets: tuple[IPNetwork, ...] = _setting(
        (),
        _networks,
        "CIDRs that webhook URLs may resolve to despite being private/loopback.",
    )
    tls_ca_file: str = _setting(
        "", _optional_str, "Extra CA bundle (PEM) trusted for webhook endpoints."
    )
    secret_rotation_grace_seconds: float = _setting(
        86_400.0,
        _seconds(allow_zero=True),
        "After a secret rotation, how long the old secret still signs deliveries too.",
    )
    cache_resync_seconds: float = _setting(
        300.0, _seconds(), "Full re-sync period of the subscription cache (safety net)."
    )
    database_timeout_seconds: float = _setting(
        60.0,
        _seconds(allow_zero=True),
        "Longest one statement of the daemon may take: past it, it fails (PostgreSQL "
        "not answering, as behind a network partition: the API answers 503, the loops "
        "retry) instead of waiting forever; 0: no limit.",
    )
    drain_timeout_seconds: float = _setting(
        20.0, _seconds(allow_zero=True), "Time allowed on SIGTERM to finish deliveries in flight."
    )
    import_batch_size: int = _setting(
        80, _int_at_least(1), "Most entities in one notification of an import batch."
    )
    import_linger_seconds: float = _setting(
        2.0, _seconds(), "A batch still open this long after its last entity goes out."
    )
    import_max_open_batches: int = _setting(
        10_000, _int_at_least(1), "Open import batches kept; beyond it the oldest goes out early."
    )
    catalog_file: str = _setting(
        "", _optional_str, "JSON file replacing the built-in entity catalog."
    )
    log_level: str = _setting("INFO", _log_level, "debug, info, warning or error.")
    log_format: str = _setting(
        "auto", _choice("auto", "json", "console"), "auto (console on a TTY), json or console."
    )
    uvloop: bool = _setting(
        True,
        _bool,
        "on/off: run the daemon's event loop on uvloop (less CPU per delivery); off: "
        "asyncio's own loop.",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every ``DISPATCHER_*`` variable; raise :class:`SettingsError` on a bad one."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = env_name(f.name)
            raw = env.get(name)
            if raw is None:
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                raise SettingsError(f"{name}: {exc}") from None
        return cls(**values)

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict fit for a log line: secrets are replaced by ``***``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"]:
                out[f.name] = _redact_url(value) if f.name == "database_url" else "***"
            elif isinstance(value, tuple):
                out[f.name] = [str(v) for v in value]
            else:
                out[f.name] = value
        return out


def env_name(field_name: str) -> str:
    """The environment variable of a settings field: ``http_port`` -> ``DISPATCHER_HTTP_PORT``."""
    return PREFIX + field_name.upper()


def documentation() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting, in declaration order."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = f.default
        if isinstance(default, tuple):
            shown = ",".join(str(d) for d in default)
        elif isinstance(default, bool):
            shown = str(default).lower()
        elif isinstance(default, float) and default.is_integer():
            shown = str(int(default))
        else:
            shown = str(default)
        rows.append((env_name(f.name), shown, f.metadata["doc"]))
    return rows


def _redact_url(url: str) -> str:
    """Hide the password of a URL such as postgresql://user:pw@host/db."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url
