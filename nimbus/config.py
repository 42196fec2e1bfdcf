"""Configuration from the environment (and a `.env` file), with the original's NIMBUS_* names.

Every variable is listed in `nimbus.variables.VARIABLES` with its default and meaning; README's
table is made from it. An invalid value raises `ConfigError` naming the variable; the entry points
turn that into a message and exit code 2. The checks of the doorman's own files (TLS, token keys)
are the doorman's (`nimbus.doorman.startup`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from nimbus.variables import DEFAULT_LINGER_MS, VARIABLES


class ConfigError(ValueError):
    pass


# Kafka consumer groups, one per topic (see Settings.events_group, Settings.results_group).
EVENTS_GROUP = "nimbus-event-consumer"
RESULTS_GROUP = "nimbus-result-router"


INGEST_BATCH = 1000  # events the pod produces (and receipts) in one batch

_POD = f"events_results_{socket.gethostname()}_{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Settings:
    port: int
    host: str
    redis_address: str
    redis_mode: str
    redis_wait_replicas: int
    redis_wait_ms: int
    kafka_brokers: str
    redis_events_channel: str
    redis_prefix: str
    kafka_events_topic: str
    kafka_results_topic: str
    kafka_dlq_topic: str
    shutdown_timeout_sec: int
    engine: str
    kafka_partitions: int
    kafka_replication_factor: (
        int | None
    )  # None: auto (nimbus.engines.replication.replication_factor)
    kafka_min_insync_replicas: (
        int | None
    )  # None: auto (nimbus.engines.replication.min_insync_replicas)
    log_level: str
    log_format: str
    instance_id: str
    delivery_timeout_ms: int
    status_interval_ms: int
    stream_queue: int
    producer_linger_ms: int
    kafka_fetch_wait_ms: int
    kafka_client: str
    router_window: int
    replay_window: int
    dlq_pack: int
    results_pack: int
    max_replays: int
    stall_ms: int
    metrics_port: int
    metrics_host: str
    metrics_interval_ms: int
    web_port: int
    web_host: str
    web_refresh_ms: int
    web_scrape: str
    http_allowed_hosts: str
    auth: str
    auth_algorithms: str
    auth_secret: str
    auth_public_key_file: str
    auth_issuer: str
    auth_audience: str
    auth_leeway_sec: int
    tls_cert_file: str
    tls_key_file: str
    tls_client_ca_file: str
    max_message_bytes: int
    max_streams: int
    client_event_rate: int
    client_event_burst: int
    max_client_id_bytes: int
    handshake_timeout_sec: int
    idle_connection_sec: int
    first_message_sec: int
    half_closed_sec: int
    stream_queue_bytes: int
    pod_queue_bytes: int
    ingest_queue_bytes: int
    record_ttl_sec: int
    retry_first_ms: int
    retry_max_ms: int
    retry_multiplier: float
    retry_jitter: float

    @property
    def pod_channel(self) -> str:
        return self.redis_events_channel

    @property
    def topics(self) -> tuple[str, str, str]:
        return (self.kafka_events_topic, self.kafka_results_topic, self.kafka_dlq_topic)

    # Per topic, so deployments (and tests) sharing a cluster never share a group. The replay has
    # no group: it reads the DLQ from each client's own cursor.
    @property
    def events_group(self) -> str:
        """The event consumers' Kafka group (on the events topic)."""
        return f"{EVENTS_GROUP}.{self.kafka_events_topic}"

    @property
    def results_group(self) -> str:
        """The result routers' Kafka group (on the results topic)."""
        return f"{RESULTS_GROUP}.{self.kafka_results_topic}"


def load(
    env: Mapping[str, str] | None = None, *, dotenv: bool = True, **overrides: Any
) -> Settings:
    """Settings from `env` (default: os.environ plus ./.env), then keyword overrides."""
    if env is None:
        if dotenv:
            from dotenv import dotenv_values

            file_values = {k: v for k, v in dotenv_values(".env").items() if v is not None}
            env = {**file_values, **os.environ}
        else:
            env = dict(os.environ)
    values: dict[str, Any] = {}
    for var in VARIABLES.values():
        raw = env.get(var.name, var.default)
        try:
            values[var.name.removeprefix("NIMBUS_").lower()] = var.parse(raw)
        except ValueError as e:
            raise ConfigError(f"invalid {var.name}: {e}") from None
    if not values["redis_events_channel"]:
        values["redis_events_channel"] = _POD
    if values["producer_linger_ms"] < 0:
        values["producer_linger_ms"] = DEFAULT_LINGER_MS[values["kafka_client"]]
    if not values["instance_id"]:
        values["instance_id"] = f"{socket.gethostname()}-{os.getpid()}"
    names = {f.name for f in fields(Settings)}
    for k in overrides:
        if k not in names:
            raise TypeError(f"unknown setting {k}")
    values.update(overrides)
    settings = Settings(**values)
    if settings.redis_mode == "cluster" and (
        "{" in settings.redis_prefix or "}" in settings.redis_prefix
    ):
        raise ConfigError(
            "invalid NIMBUS_REDIS_PREFIX: with NIMBUS_REDIS_MODE=cluster it may not contain braces"
            " (Nimbus puts each client's hash tag in its keys)"
        )
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    """Checks across variables."""
    if s.stream_queue < s.replay_window + INGEST_BATCH:
        # A replay sends up to a window of results at once and the pod receipts up to a batch of
        # events at once: a smaller queue would cut every replaying client, again and again.
        raise ConfigError(
            f"invalid NIMBUS_STREAM_QUEUE: {s.stream_queue} is below NIMBUS_REPLAY_WINDOW + "
            f"{INGEST_BATCH} ({s.replay_window + INGEST_BATCH}); a replay would cut its own stream"
        )
    rf, isr = s.kafka_replication_factor, s.kafka_min_insync_replicas
    if rf is not None and isr is not None and isr > rf:
        # A topic whose min.insync.replicas exceeds its replicas refuses every acks=all write.
        raise ConfigError(
            f"invalid NIMBUS_KAFKA_MIN_INSYNC_REPLICAS: {isr} is above"
            f" NIMBUS_KAFKA_REPLICATION_FACTOR ({rf}); no write could ever be acknowledged"
        )
