"""Every entry point answers a wrong input or an unreachable dependency with one line that says
what to do, and a distinct exit status (README, "Errors and exit codes"), never a traceback.

Each case runs the command as a subprocess, with a timeout, on ports chosen at run time (a socket
bound here makes a busy port). Kafka "unreachable" is 127.0.0.1:1; the engines wait ~15 s for it,
so those four cases start together when the module starts and are checked at its end. Only the
Redis case needs the real brokers (marker `integration`). The chaos and benchmark scripts get
only inputs that stop them before they touch a broker, with the old code as well.
"""

from __future__ import annotations

import http.server
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests import harness

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PY_FROM_ROOT = os.path.relpath(PY, ROOT)  # how the hint names this interpreter (run from ROOT)
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} ")  # nimbus.logs' human format
READY = re.compile(r"ready on port (\d+) .*Try: (.+)$")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any NIMBUS_* of the caller's (the test brokers' exports)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_")}
    return {**env, "NIMBUS_WEB_PORT": "0", **extra}


def run(args: list[str], timeout: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, *args],
        env=clean_env(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def one_line(
    p: subprocess.CompletedProcess[str] | tuple[int | None, str, str],
    code: int,
    prefix: str,
    *needles: str,
    only: bool = True,
) -> str:
    """Assert the failure's shape: exit `code`, no traceback or exception group anywhere, and a
    last stderr line `prefix...` holding every needle (what went wrong, what to do). `only`: that
    line is all of stderr; otherwise the lines before it are the process's log lines."""
    rc, out, err = (p.returncode, p.stdout, p.stderr) if not isinstance(p, tuple) else p
    both = out + err
    assert rc == code, both[-3000:]
    assert "Traceback" not in both and "ExceptionGroup" not in both, both[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, both
    last = lines[-1]
    assert last.startswith(prefix), last
    for n in needles:
        assert n in last, (n, last)
    if only:
        assert len(lines) == 1, lines
    else:
        assert all(LOG_LINE.match(line) for line in lines[:-1]), lines
    return last


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something listens on (every interface, as the servers bind by default)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.fixture
def free_port() -> int:
    return harness.free_port()


@pytest.fixture
def web_server() -> Iterator[int]:
    """`python3 -m http.server`, in a thread: a port that speaks HTTP/1, not gRPC."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


# --- Kafka unreachable: ~15 s each, so all of them at once ------------------------------------

KAFKA_DOWN = {
    "server": ["-m", "nimbus.server"],
    "workers": ["-m", "nimbus.workers"],
    "admin": ["-m", "nimbus.admin", "clients"],
    "web": ["-m", "nimbus.web"],
}


@pytest.fixture(scope="module", autouse=True)
def kafka_down(request: pytest.FixtureRequest) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Start the Kafka-unreachable cases when the module starts (only those selected), so their
    wait overlaps the other tests."""
    wanted = {
        item.callspec.params["name"]
        for item in request.session.items
        if item.originalname == "test_kafka_unreachable_is_one_line_exit_3"
    }
    env = clean_env(
        NIMBUS_ENGINE="real",
        NIMBUS_KAFKA_BROKERS="127.0.0.1:1",
        NIMBUS_REDIS_ADDRESS="127.0.0.1:1",
        NIMBUS_PORT="0",
    )
    procs = {
        name: subprocess.Popen(
            [PY, *args],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in KAFKA_DOWN.items()
        if name in wanted
    }
    try:
        yield procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.communicate()


# --- the processes: configuration, ports ------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "prefix"),
    [(["-m", "nimbus"], "nimbus: "), (["-m", "nimbus.server"], "nimbus.server: ")],
)
def test_a_busy_port_is_one_line_exit_4(busy_port: int, args: list[str], prefix: str) -> None:
    p = run(args, NIMBUS_ENGINE="memory", NIMBUS_PORT=str(busy_port))
    one_line(
        p,
        4,
        prefix,
        f"cannot listen on 0.0.0.0:{busy_port}",
        "in use",
        "set NIMBUS_PORT to a free port",
        only=False,
    )


def test_a_busy_metrics_port_names_its_variable(busy_port: int) -> None:
    p = run(["-m", "nimbus"], NIMBUS_PORT="0", NIMBUS_METRICS_PORT=str(busy_port))
    one_line(p, 4, "nimbus: ", "in use", "set NIMBUS_METRICS_PORT", only=False)


def test_a_busy_web_port_stops_nimbus_web_but_not_the_all_in_one(busy_port: int) -> None:
    p = run(["-m", "nimbus.web"], NIMBUS_ENGINE="memory", NIMBUS_WEB_PORT=str(busy_port))
    one_line(p, 4, "nimbus.web: ", "in use", "set NIMBUS_WEB_PORT", only=False)
    # The all-in-one serves without its web view: it warns, becomes ready, drains on SIGINT.
    proc = subprocess.Popen(
        [PY, "-m", "nimbus"],
        env=clean_env(NIMBUS_PORT="0", NIMBUS_WEB_PORT=str(busy_port)),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "".join(seen)
            seen.append(line)
            if READY.search(line):
                break
        warning = [line for line in seen if "live web view not started" in line]
        assert warning and "NIMBUS_WEB_PORT" in warning[0], seen
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_an_address_not_of_this_host_is_one_line_exit_4() -> None:
    # 192.0.2.1: TEST-NET-1 (RFC 5737), never an address of this machine
    p = run(["-m", "nimbus"], NIMBUS_HOST="192.0.2.1", NIMBUS_PORT="0")
    one_line(p, 4, "nimbus: ", "192.0.2.1", "set NIMBUS_HOST", only=False)


def test_debug_logging_shows_the_traceback_before_the_line(busy_port: int) -> None:
    p = run(["-m", "nimbus"], NIMBUS_PORT=str(busy_port), NIMBUS_LOG_LEVEL="debug")
    assert p.returncode == 4
    assert "Traceback" in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("nimbus: cannot listen on")


def test_a_short_jwt_secret_refuses_to_start() -> None:
    p = run(
        ["-m", "nimbus.server"],
        NIMBUS_ENGINE="memory",
        NIMBUS_AUTH="jwt",
        NIMBUS_AUTH_SECRET="too-short",
    )
    one_line(p, 2, "nimbus.server: ", "NIMBUS_AUTH_SECRET is 9 bytes", "openssl rand -hex 32")


@pytest.mark.parametrize(
    ("args", "prefix", "needle"),
    [
        (["-m", "nimbus.workers", "--roles", "nope"], "python -m nimbus.workers: ", "unknown"),
        (["-m", "nimbus.admin", "bogus"], "python -m nimbus.admin: ", "invalid choice"),
        (["-m", "nimbus", "--engine", "x"], "python -m nimbus: ", "invalid choice"),
        (["-m", "nimbus.web", "--bogus"], "python -m nimbus.web: ", "unrecognized"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(args: list[str], prefix: str, needle: str) -> None:
    one_line(run(args), 2, prefix, needle, "--help")


def test_the_admin_refuses_the_memory_engine() -> None:
    p = run(["-m", "nimbus.admin", "clients"], NIMBUS_ENGINE="memory")
    one_line(p, 2, "nimbus.admin: ", "NIMBUS_ENGINE=real")


def test_ctrl_c_while_waiting_for_kafka_is_one_line_exit_130() -> None:
    proc = subprocess.Popen(
        [PY, "-m", "nimbus.server"],
        env=clean_env(NIMBUS_ENGINE="real", NIMBUS_KAFKA_BROKERS="127.0.0.1:1", NIMBUS_PORT="0"),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)  # imported, waiting for Kafka (~15 s)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    one_line((proc.returncode, out, err), 130, "nimbus.server: interrupted", only=False)


@pytest.mark.integration
def test_redis_unreachable_is_one_line_exit_3(kafka_brokers: str, unique: str) -> None:
    p = run(
        ["-m", "nimbus.server"],
        NIMBUS_ENGINE="real",
        NIMBUS_KAFKA_BROKERS=kafka_brokers,
        NIMBUS_REDIS_ADDRESS="127.0.0.1:1",
        NIMBUS_PORT="0",
        NIMBUS_KAFKA_EVENTS_TOPIC=f"events-{unique}",
        NIMBUS_KAFKA_RESULTS_TOPIC=f"results-{unique}",
        NIMBUS_KAFKA_DLQ_TOPIC=f"dlq-{unique}",
    )
    one_line(p, 3, "nimbus.server: ", "redis at 127.0.0.1:1", "NIMBUS_REDIS_ADDRESS", only=False)


# --- the client and the token -----------------------------------------------------------------


@asynccontextmanager
async def all_in_one(**env: str) -> AsyncIterator[tuple[int, str]]:
    """`python -m nimbus` (memory engine) on a free port: (port, the command its hint prints).
    Stopped with SIGINT on exit, which must drain it to exit 0."""
    proc = await trio.lowlevel.open_process(
        [PY, "-m", "nimbus"],
        env=clean_env(NIMBUS_PORT="0", NIMBUS_HOST="127.0.0.1", **env),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    log: list[str] = []
    ready = trio.Event()
    found: list[tuple[int, str]] = []

    async def read_log() -> None:
        assert proc.stderr is not None
        buf = b""
        async for chunk in proc.stderr:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                log.append(line)
                m = READY.search(line)
                if m and not found:
                    found.append((int(m.group(1)), m.group(2)))
                    ready.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_log)
            with trio.fail_after(30):
                await ready.wait()
            yield found[0]
            proc.send_signal(signal.SIGINT)
            with trio.fail_after(20):
                code = await proc.wait()
            assert code == 0, "\n".join(log[-40:])
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert not any("Traceback" in line for line in log), "\n".join(log[-40:])


async def test_the_start_up_hint_runs_as_printed() -> None:
    """README: `make run` (the all-in-one from the checkout, on .venv/bin/python), then the
    command it prints, in another terminal in the same directory."""
    with trio.fail_after(60):
        async with all_in_one() as (port, hint):
            assert hint.startswith(f"{PY_FROM_ROOT} -m nimbus.client "), hint
            assert hint.endswith(f"--target 127.0.0.1:{port}"), hint
            p = await trio.run_process(
                shlex.split(hint),
                cwd=ROOT,
                env=clean_env(),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().splitlines()[-1].startswith("sq(10) = 100")


async def test_a_client_id_that_is_no_metadata_value_is_one_line_exit_2() -> None:
    with trio.fail_after(60):
        async with all_in_one() as (port, _):
            p = await trio.run_process(
                [PY, "-m", "nimbus.client", "--client_id=é", "--target", f"127.0.0.1:{port}"],
                cwd=ROOT,
                env=clean_env(),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    one_line(
        (p.returncode, p.stdout.decode(), p.stderr.decode()),
        2,
        "python -m nimbus.client: ",
        "printable ASCII",
        "--help",
    )


def test_the_client_says_at_once_that_a_web_server_is_no_grpc_server(web_server: int) -> None:
    started = time.monotonic()
    p = run(["-m", "nimbus.client", "--target", f"127.0.0.1:{web_server}"], timeout=20)
    one_line(p, 3, f"127.0.0.1:{web_server} does not speak gRPC/HTTP2", "HTTP/1", "--target")
    assert time.monotonic() - started < 10


def test_the_client_says_when_a_port_answers_nothing() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        p = run(["-m", "nimbus.client", "--target", f"127.0.0.1:{port}"], timeout=20)
    one_line(p, 3, f"127.0.0.1:{port} does not speak gRPC/HTTP2", "no HTTP/2 answer")
    assert time.monotonic() - started < 15


def test_the_token_command_refuses_a_short_secret() -> None:
    p = run(["-m", "nimbus.token", "--client-id", "a"], NIMBUS_AUTH_SECRET="short")
    one_line(p, 2, "python -m nimbus.token: ", "5 bytes", "at least 32", "openssl rand -hex 32")


# --- the scripts ------------------------------------------------------------------------------


def test_the_load_client_checks_its_targets_first(free_port: int, web_server: int) -> None:
    script = str(ROOT / "scripts" / "load_client.py")
    p = run([script, "--clients", "2", "--events", "2", "--targets", f"127.0.0.1:{free_port}"])
    one_line(p, 3, "load_client.py: cannot reach Nimbus", "start the servers first")
    p = run([script, "--clients", "2", "--events", "2", "--targets", f"127.0.0.1:{web_server}"])
    one_line(p, 3, "load_client.py: ", "does not speak gRPC/HTTP2")
    p = run([script, "--prefix", "é", "--targets", f"127.0.0.1:{free_port}"])
    one_line(p, 2, "load_client.py: ", "--prefix", "printable ASCII")
    p = run([script, "--timeout", "-1", "--targets", f"127.0.0.1:{free_port}"])
    one_line(p, 2, "load_client.py: ", "--timeout must be > 0")


# Each of these stops in argument parsing, with the old code too: neither script may ever reach
# the shared brokers from here (chaos.py kills them, bench.py rewrites docs/BENCHMARKS.md).
NO_DIR = "/proc/nimbus-no-such-dir/run"


@pytest.mark.parametrize(
    ("args", "env", "needles"),
    [
        ([], {"NIMBUS_KAFKA_PORT": "abc"}, ["--kafka-port", "invalid int value"]),
        (["--run-dir", NO_DIR], {}, ["--run-dir", "cannot create"]),
        (["--progress", "0", "--run-dir", NO_DIR], {}, ["--progress must be > 0"]),
        (["--prefix", "a b", "--run-dir", NO_DIR], {}, ["--prefix may hold only"]),
    ],
)
def test_chaos_usage_errors_are_one_line_exit_2(
    args: list[str], env: dict[str, str], needles: list[str]
) -> None:
    p = run([str(ROOT / "scripts" / "chaos.py"), *args], **env)
    one_line(p, 2, "chaos.py: ", *needles)


@pytest.mark.parametrize(
    ("args", "env", "needles"),
    [
        ([], {"NIMBUS_REDIS_PORT": "x"}, ["--redis-port", "invalid int value"]),
        (["--render-only", "/nonexistent/run.json"], {}, ["--render-only", "no such file"]),
        (
            ["--phases", "live,nope", "--render-only", "/nonexistent/run.json"],
            {},
            ["--phases: unknown nope"],
        ),
    ],
)
def test_bench_usage_errors_are_one_line_exit_2(
    args: list[str], env: dict[str, str], needles: list[str]
) -> None:
    p = run([str(ROOT / "scripts" / "bench.py"), *args], **env)
    one_line(p, 2, "bench.py: ", *needles)


# --- Kafka unreachable (started with the module) ----------------------------------------------


@pytest.mark.parametrize("name", KAFKA_DOWN)
def test_kafka_unreachable_is_one_line_exit_3(
    name: str, kafka_down: dict[str, subprocess.Popen[str]]
) -> None:
    proc = kafka_down[name]
    out, err = proc.communicate(timeout=60)
    prefix = "nimbus: " if name == "all-in-one" else f"nimbus.{name}: "
    one_line(
        (proc.returncode, out, err),
        3,
        prefix + "Kafka at 127.0.0.1:1 is not reachable",
        "NIMBUS_KAFKA_BROKERS",
        "scripts/services.sh up",
        only=False,
    )
