"""Every NIMBUS_* variable: its name, default, parser and meaning. README's table is made from
`VARIABLES`; `nimbus.config.load` reads them into `Settings`. A parser raises ValueError on a bad
value, and `load` turns that into a ConfigError naming the variable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            v = int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {v}")
        return v

    return parse


# NIMBUS_PRODUCER_LINGER_MS when unset, per NIMBUS_KAFKA_CLIENT: kafka-python's produce batches
# cost ~1-2 ms of CPU each, so it gathers 2 ms of records; librdkafka's cost ~0.4 ms and it
# batches by itself while requests are in flight, so it sends at once (lower paced latency).
DEFAULT_LINGER_MS = {"kafka-python": 2, "librdkafka": 0}


def _linger(raw: str) -> int:
    """-1 (the client's default, DEFAULT_LINGER_MS) when empty, else 0..10,000 ms."""
    return -1 if not raw.strip() else _int(0, 10_000)(raw.strip())


def _auto_or_int(lo: int, hi: int) -> Callable[[str], int | None]:
    """None for `auto` (the rule is applied against the cluster, nimbus.engines.replication), else lo..hi."""

    def parse(raw: str) -> int | None:
        v = raw.strip().lower()
        if v == "auto":
            return None
        try:
            n = int(v)
        except ValueError:
            raise ValueError(f"expected auto or an integer, got {raw!r}") from None
        if not lo <= n <= hi:
            raise ValueError(f"must be auto or between {lo} and {hi}, got {n}")
        return n

    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            v = float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
        if not lo <= v <= hi:  # also refuses nan
            raise ValueError(f"must be between {lo:g} and {hi:g}, got {raw.strip()}")
        return v

    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        v = raw.strip().lower()
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {raw!r}")
        return v

    return parse


def _nonempty(raw: str) -> str:
    v = raw.strip()
    if not v:
        raise ValueError("must not be empty")
    return v


def _hostport(raw: str) -> str:
    v = _nonempty(raw)
    for part in v.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected host:port[,host:port...], got {raw!r}")
    return v


def _algorithms(raw: str) -> str:
    """'hs256, RS256' -> 'HS256,RS256'. Which ones are supported is the doorman's start-up check
    (nimbus.doorman.startup): only the process that verifies tokens knows them."""
    algs = dict.fromkeys(a.strip().upper() for a in raw.split(",") if a.strip())
    if not algs:
        raise ValueError("must name at least one algorithm")
    return ",".join(algs)


def _bool(raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {raw!r}")


@dataclass(frozen=True, slots=True)
class Var:
    name: str
    default: str
    parse: Callable[[str], Any]
    help: str


VARIABLES: dict[str, Var] = {
    v.name: v
    for v in [
        Var("NIMBUS_PORT", "50051", _int(0, 65535), "gRPC port of the server (0: any free port)"),
        Var("NIMBUS_HOST", "0.0.0.0", _nonempty, "address the gRPC server binds"),
        Var(
            "NIMBUS_REDIS_ADDRESS",
            "localhost:6379",
            _hostport,
            "Redis host:port (engine=real); with NIMBUS_REDIS_MODE=cluster, seed nodes"
            " host:port,host:port,...",
        ),
        Var(
            "NIMBUS_REDIS_MODE",
            "single",
            _choice("single", "cluster"),
            "single (one Redis node) or cluster (Redis Cluster: hash-tagged keys, sharded pub/sub)",
        ),
        Var(
            "NIMBUS_REDIS_WAIT_REPLICAS",
            "1",
            _int(0, 16),
            "cluster mode: replicas that must confirm each state write (WAIT) before it counts;"
            " 0: none (a failover may lose the last writes)",
        ),
        Var(
            "NIMBUS_REDIS_WAIT_MS",
            "1000",
            _int(1, 60_000),
            "cluster mode: how long a write waits for NIMBUS_REDIS_WAIT_REPLICAS before it fails",
        ),
        Var(
            "NIMBUS_KAFKA_BROKERS",
            "localhost:9092",
            _hostport,
            "Kafka bootstrap servers (engine=real)",
        ),
        Var(
            "NIMBUS_REDIS_EVENTS_CHANNEL",
            "",
            str,
            "this pod's results channel; must be unique per pod (default: events_results_<host>_<pid>)",
        ),
        Var(
            "NIMBUS_REDIS_PREFIX",
            "nimbus:",
            _nonempty,
            "namespace of every Redis key and channel of this deployment",
        ),
        Var("NIMBUS_KAFKA_EVENTS_TOPIC", "events-v1-topic", _nonempty, "events topic"),
        Var("NIMBUS_KAFKA_RESULTS_TOPIC", "results-v1-topic", _nonempty, "results topic"),
        Var("NIMBUS_KAFKA_DLQ_TOPIC", "dlq-v1-topic", _nonempty, "dead-letter (replay) topic"),
        Var("NIMBUS_SHUTDOWN_TIMEOUT_SEC", "15", _int(0, 3600), "graceful shutdown limit, seconds"),
        Var(
            "NIMBUS_ENGINE",
            "real",
            _choice("real", "memory"),
            "real (Kafka+Redis) or memory (embedded)",
        ),
        Var("NIMBUS_KAFKA_PARTITIONS", "8", _int(1, 10_000), "partitions of topics Nimbus creates"),
        Var(
            "NIMBUS_KAFKA_REPLICATION_FACTOR",
            "auto",
            _auto_or_int(1, 32_767),
            "replication factor of topics Nimbus creates (auto: 3, or the number of brokers the"
            " cluster reports if fewer); existing topics are not changed",
        ),
        Var(
            "NIMBUS_KAFKA_MIN_INSYNC_REPLICAS",
            "auto",
            _auto_or_int(1, 32_767),
            "min.insync.replicas of topics Nimbus creates, at most the replication factor (auto: 2"
            " when the replication factor is 3 or more, else 1)",
        ),
        Var(
            "NIMBUS_LOG_LEVEL",
            "INFO",
            _choice("trace", "debug", "info", "success", "warning", "error"),
            "log level",
        ),
        Var("NIMBUS_LOG_FORMAT", "human", _choice("human", "json"), "log format"),
        Var("NIMBUS_INSTANCE_ID", "", str, "instance id in traces and logs (default: host-pid)"),
        Var(
            "NIMBUS_DELIVERY_TIMEOUT_MS",
            "10000",
            _int(10, 3_600_000),
            "a live delivery not confirmed by the pod within this is diverted to the DLQ",
        ),
        Var(
            "NIMBUS_STATUS_INTERVAL_MS",
            "1000",
            _int(10, 3_600_000),
            "status manager's periodic Triple Lag Check",
        ),
        Var(
            "NIMBUS_STREAM_QUEUE",
            "10000",
            _int(1, 10_000_000),
            "results buffered per stream before the stream is cut as a slow reader",
        ),
        Var(
            "NIMBUS_PRODUCER_LINGER_MS",
            "",
            _linger,
            "Kafka producer linger, ms (empty: the client's default here, kafka-python 2,"
            " librdkafka 0)",
        ),
        Var(
            "NIMBUS_KAFKA_CLIENT",
            "kafka-python",
            _choice("kafka-python", "librdkafka"),
            "Kafka client library (engine=real): kafka-python or librdkafka (confluent-kafka)",
        ),
        Var(
            "NIMBUS_KAFKA_FETCH_WAIT_MS",
            "0",
            _int(0, 500),
            "librdkafka only: a group consumer's fetch waits this long at the broker for records"
            " to gather (0: it returns with the first record; librdkafka's default)",
        ),
        Var(
            "NIMBUS_ROUTER_WINDOW",
            "20000",
            _int(1, 10_000_000),
            "results in flight per result router",
        ),
        Var(
            "NIMBUS_REPLAY_WINDOW",
            "2000",
            _int(1, 10_000_000),
            "results in flight per replaying client",
        ),
        Var(
            "NIMBUS_RESULTS_PACK",
            "256",
            _int(1, 10_000),
            "results of one client per results-topic record (a pack; 1: one result per record, the original's layout); see nimbus/wire/packs.py",
        ),
        Var(
            "NIMBUS_DLQ_PACK",
            "256",
            _int(1, 10_000),
            "results of one client per DLQ record (a pack; 1: one result per record, the original's layout); see nimbus/wire/packs.py",
        ),
        Var("NIMBUS_MAX_REPLAYS", "1000", _int(1, 1_000_000), "concurrent replays per worker"),
        Var(
            "NIMBUS_STALL_MS",
            "30000",
            _int(100, 3_600_000),
            "a replay or a router's result that makes no progress for this long is logged at ERROR once and counted (replay.stalled, router.stalled); the replay is retried with back-off",
        ),
        Var(
            "NIMBUS_METRICS_PORT",
            "0",
            _int(0, 65535),
            "Prometheus metrics port of this process (GET /metrics); 0: off",
        ),
        Var(
            "NIMBUS_METRICS_HOST",
            "127.0.0.1",
            _nonempty,
            "address the metrics endpoint binds (0.0.0.0 for a scraper on another host)",
        ),
        Var(
            "NIMBUS_METRICS_INTERVAL_MS",
            "5000",
            _int(10, 3_600_000),
            "how often Kafka lag, clients by state and replay backlogs are sampled",
        ),
        Var(
            "NIMBUS_WEB_PORT",
            "8080",
            _int(0, 65535),
            "port of the live web view (python -m nimbus.web, and the all-in-one); 0: off",
        ),
        Var("NIMBUS_WEB_HOST", "127.0.0.1", _nonempty, "address the live web view binds"),
        Var(
            "NIMBUS_WEB_REFRESH_MS",
            "1000",
            _int(50, 3_600_000),
            "how often the web view samples Kafka and the state store",
        ),
        Var(
            "NIMBUS_WEB_SCRAPE",
            "",
            str,
            "web view: metrics endpoints (host:port,...) of the pods and workers to sum per-stage counters from",
        ),
        Var(
            "NIMBUS_HTTP_ALLOWED_HOSTS",
            "",
            str,
            "metrics endpoint and web view: Host names (comma-separated) answered besides the bind address and localhost/127.0.0.1/[::1], against DNS rebinding; others get 403; *: any",
        ),
        Var(
            "NIMBUS_AUTH",
            "off",
            _choice("off", "jwt"),
            "off: trust the client_id metadata (the original's behaviour); jwt: require `authorization: Bearer <jwt>` whose subject is the client id",
        ),
        Var(
            "NIMBUS_AUTH_ALGORITHMS",
            "HS256",
            _algorithms,
            "token algorithms accepted (comma list of HS256/384/512, RS*, PS*, ES*)",
        ),
        Var("NIMBUS_AUTH_SECRET", "", str, "shared secret for HS* tokens"),
        Var(
            "NIMBUS_AUTH_PUBLIC_KEY_FILE",
            "",
            str,
            "PEM public key (or certificate) for RS*/PS*/ES* tokens",
        ),
        Var("NIMBUS_AUTH_ISSUER", "", str, "required `iss` of tokens (empty: not checked)"),
        Var("NIMBUS_AUTH_AUDIENCE", "", str, "required `aud` of tokens (empty: not checked)"),
        Var(
            "NIMBUS_AUTH_LEEWAY_SEC",
            "5",
            _int(0, 3600),
            "clock skew allowed on `exp`/`nbf`/`iat`, seconds",
        ),
        Var(
            "NIMBUS_TLS_CERT_FILE",
            "",
            str,
            "PEM certificate chain of the gRPC port; with the key, switches TLS on",
        ),
        Var("NIMBUS_TLS_KEY_FILE", "", str, "PEM private key of that certificate"),
        Var(
            "NIMBUS_TLS_CLIENT_CA_FILE",
            "",
            str,
            "CA bundle: when set, clients must present a certificate it signed (mutual TLS)",
        ),
        Var(
            "NIMBUS_MAX_MESSAGE_BYTES",
            "1048576",
            _int(64, 64 * 1024 * 1024),
            "largest request message accepted; a larger one ends the stream with RESOURCE_EXHAUSTED",
        ),
        Var(
            "NIMBUS_MAX_STREAMS",
            "10000",
            _int(1, 10_000_000),
            "open streams per server pod; more are refused with RESOURCE_EXHAUSTED",
        ),
        Var(
            "NIMBUS_CLIENT_EVENT_RATE",
            "0",
            _int(0, 10_000_000),
            "events per second per client per pod (token bucket; 0: unlimited); over it an event is refused",
        ),
        Var(
            "NIMBUS_CLIENT_EVENT_BURST",
            "0",
            _int(0, 10_000_000),
            "token bucket capacity (0: one second's worth of the rate)",
        ),
        Var(
            "NIMBUS_MAX_CLIENT_ID_BYTES",
            "256",
            _int(1, 16_384),
            "longest client_id accepted (printable ASCII); a longer one is refused with INVALID_ARGUMENT before any state changes",
        ),
        Var(
            "NIMBUS_HANDSHAKE_TIMEOUT_SEC",
            "10",
            _int(1, 3600),
            "a connection must complete the HTTP/2 preface (after TLS) within this, or it is closed",
        ),
        Var(
            "NIMBUS_IDLE_CONNECTION_SEC",
            "120",
            _int(1, 86_400),
            "a connection with no open stream for this long is closed (GOAWAY first)",
        ),
        Var(
            "NIMBUS_FIRST_MESSAGE_SEC",
            "30",
            _int(0, 86_400),
            "a stream must send its first message within this (the client library sends one at once; 0: no limit), or it ends with DEADLINE_EXCEEDED",
        ),
        Var(
            "NIMBUS_HALF_CLOSED_SEC",
            "60",
            _int(1, 86_400),
            "a stream the client half-closed ends with OK once every result of its events is delivered (and acked); it waits at most this long, then ends with DEADLINE_EXCEEDED (the rest goes to its backlog)",
        ),
        Var(
            "NIMBUS_STREAM_QUEUE_BYTES",
            "8388608",
            _int(65_536, 1 << 40),
            "bytes of responses queued per stream (with NIMBUS_STREAM_QUEUE, a count) before the stream is cut as a slow reader",
        ),
        Var(
            "NIMBUS_POD_QUEUE_BYTES",
            "268435456",
            _int(1 << 20, 1 << 42),
            "bytes of responses queued over all streams of a pod; past it, the stream with the most queued is cut as a slow reader",
        ),
        Var(
            "NIMBUS_INGEST_QUEUE_BYTES",
            "67108864",
            _int(65_536, 1 << 40),
            "bytes of events waiting to be produced by a pod; past it, streams wait (HTTP/2 flow control pushes back on the clients)",
        ),
        Var(
            "NIMBUS_RECORD_TTL_SEC",
            "604800",
            _int(0, 1 << 31),
            "a client's state record expires this long after it went OFFLINE with nothing pending (0: never)",
        ),
        # The retry policy of the workers' and pods' loops (nimbus/core/retry.py).
        Var(
            "NIMBUS_RETRY_FIRST_MS",
            "100",
            _int(1, 60_000),
            "a loop retrying after a Kafka/Redis error waits this after its first failure in a row",
        ),
        Var(
            "NIMBUS_RETRY_MAX_MS",
            "2000",
            _int(1, 600_000),
            "longest wait between retries (the delay grows to it)",
        ),
        Var(
            "NIMBUS_RETRY_MULTIPLIER",
            "2",
            _float(1, 10),
            "each further failure in a row multiplies the wait by this (1: a fixed wait)",
        ),
        Var(
            "NIMBUS_RETRY_JITTER",
            "0.2",
            _float(0, 1),
            "fraction of each wait taken off at random, so processes do not retry in step (0: none)",
        ),
    ]
}
