"""Configuration: the original's NIMBUS_* names and defaults, validation, exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nimbus import config, variables

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_originals() -> None:
    s = config.load(env={}, dotenv=False)
    assert s.port == 50051
    assert s.redis_address == "localhost:6379"
    assert s.kafka_brokers == "localhost:9092"
    assert (s.kafka_events_topic, s.kafka_results_topic, s.kafka_dlq_topic) == (
        "events-v1-topic",
        "results-v1-topic",
        "dlq-v1-topic",
    )
    assert s.shutdown_timeout_sec == 15
    assert s.pod_channel.startswith("events_results_")


def test_environment_overrides() -> None:
    s = config.load(
        env={
            "NIMBUS_PORT": "6000",
            "NIMBUS_REDIS_EVENTS_CHANNEL": "pod-7",
            "NIMBUS_ENGINE": "memory",
        },
        dotenv=False,
    )
    assert (s.port, s.pod_channel, s.engine) == (6000, "pod-7", "memory")


def test_consumer_groups_are_per_topic() -> None:
    """Kafka keeps committed offsets under these names: a change would orphan them."""
    s = config.load(env={}, dotenv=False)
    assert s.events_group == "nimbus-event-consumer.events-v1-topic"
    assert s.results_group == "nimbus-result-router.results-v1-topic"
    s = config.load(
        env={"NIMBUS_KAFKA_EVENTS_TOPIC": "ev", "NIMBUS_KAFKA_RESULTS_TOPIC": "res"}, dotenv=False
    )
    assert s.events_group == "nimbus-event-consumer.ev"
    assert s.results_group == "nimbus-result-router.res"


@pytest.mark.parametrize(
    ("var", "value", "fragment"),
    [
        ("NIMBUS_PORT", "http", "expected an integer"),
        ("NIMBUS_PORT", "70000", "between 0 and 65535"),
        ("NIMBUS_KAFKA_BROKERS", "nohostport", "host:port"),
        ("NIMBUS_ENGINE", "docker", "one of real, memory"),
        ("NIMBUS_SHUTDOWN_TIMEOUT_SEC", "-1", "between"),
        ("NIMBUS_KAFKA_REPLICATION_FACTOR", "0", "auto or between 1 and"),
        ("NIMBUS_KAFKA_REPLICATION_FACTOR", "three", "expected auto or an integer"),
        ("NIMBUS_KAFKA_MIN_INSYNC_REPLICAS", "-2", "auto or between 1 and"),
    ],
)
def test_invalid_values_name_the_variable(var: str, value: str, fragment: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.load(env={var: value}, dotenv=False)
    assert var in str(e.value) and fragment in str(e.value)


def test_replication_settings() -> None:
    """`auto` (None) is resolved against the cluster when topics are created (nimbus.topics)."""
    s = config.load(env={}, dotenv=False)
    assert (s.kafka_replication_factor, s.kafka_min_insync_replicas) == (None, None)
    s = config.load(
        env={"NIMBUS_KAFKA_REPLICATION_FACTOR": "3", "NIMBUS_KAFKA_MIN_INSYNC_REPLICAS": " 2 "},
        dotenv=False,
    )
    assert (s.kafka_replication_factor, s.kafka_min_insync_replicas) == (3, 2)
    s = config.load(env={"NIMBUS_KAFKA_MIN_INSYNC_REPLICAS": "AUTO"}, dotenv=False)
    assert s.kafka_min_insync_replicas is None
    with pytest.raises(config.ConfigError, match="NIMBUS_KAFKA_MIN_INSYNC_REPLICAS: 3 is above"):
        config.load(
            env={"NIMBUS_KAFKA_REPLICATION_FACTOR": "2", "NIMBUS_KAFKA_MIN_INSYNC_REPLICAS": "3"},
            dotenv=False,
        )


def test_redis_mode_settings() -> None:
    s = config.load(env={}, dotenv=False)
    assert (s.redis_mode, s.redis_wait_replicas, s.redis_wait_ms) == ("single", 1, 1000)
    env = {"NIMBUS_REDIS_MODE": "cluster", "NIMBUS_REDIS_ADDRESS": "a:7000,b:7001"}
    s = config.load(env={**env, "NIMBUS_REDIS_WAIT_REPLICAS": "0"}, dotenv=False)
    assert (s.redis_mode, s.redis_address, s.redis_wait_replicas) == ("cluster", "a:7000,b:7001", 0)
    with pytest.raises(config.ConfigError, match="NIMBUS_REDIS_MODE"):
        config.load(env={"NIMBUS_REDIS_MODE": "sentinel"}, dotenv=False)
    with pytest.raises(
        config.ConfigError, match="NIMBUS_REDIS_PREFIX: with NIMBUS_REDIS_MODE=cluster"
    ):
        config.load(env={**env, "NIMBUS_REDIS_PREFIX": "app{1}:"}, dotenv=False)
    assert config.load(env={"NIMBUS_REDIS_PREFIX": "app{1}:"}, dotenv=False).redis_prefix


def test_dotenv_file_is_read_and_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text('NIMBUS_PORT=7001\nNIMBUS_KAFKA_DLQ_TOPIC="dlq-x"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NIMBUS_PORT", "7002")
    s = config.load()
    assert (s.port, s.kafka_dlq_topic) == (7002, "dlq-x")


@pytest.mark.parametrize("module", ["nimbus", "nimbus.server", "nimbus.workers"])
def test_processes_exit_2_on_bad_config(module: str) -> None:
    env = {**os.environ, "NIMBUS_PORT": "not-a-port"}
    p = subprocess.run(
        [sys.executable, "-m", module],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert p.returncode == 2, p.stderr
    assert "NIMBUS_PORT" in p.stderr


def test_readme_lists_every_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [v for v in variables.VARIABLES if v not in readme]
    assert not missing, f"README does not document {missing}"
