"""The Nimbus processes a script starts (bench.py and fleet.py, chaos.py): `Proc`, one child process
(`python -m <module>`) with its log file and the line that says it is up, and `Fleet`, a set of
them: start and wait until up, stop (SIGTERM, then SIGKILL), kill and restart after a delay, and
restart what exits on its own, with a backoff (`supervise`). `nimbus_env` is the environment of a
run with topics and a Redis namespace of its own on the real brokers. Imported as a sibling
(`import procs`), as shared.py is."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import trio
from shared import HOST, free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CLK = os.sysconf("SC_CLK_TCK")
POD_READY = "doorman listening"

try:  # children can die with their parent even if it is SIGKILLed (Linux: PR_SET_PDEATHSIG)
    _LIBC: Any = ctypes.CDLL(None, use_errno=True)
    _LIBC.prctl  # noqa: B018 - probe
except (OSError, AttributeError):
    _LIBC = None


def _die_with_parent() -> None:
    if _LIBC is not None:
        _LIBC.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def wall() -> str:
    """Local wall-clock time as the Nimbus logs print it (HH:MM:SS.mmm)."""
    return datetime.now().strftime("%H:%M:%S.%f")[:-3]


async def run_logged(
    log: Path, argv: list[str], env: dict[str, str], title: str, timeout: float
) -> int:
    """Run `argv` (from the repo's root) with its output appended to `log` under a header
    naming `title`; its exit status, -1 if it did not end within `timeout` s."""
    import trio

    with log.open("ab") as out:
        out.write(f"\n===== chaos: {title} at {wall()} =====\n".encode())
        out.flush()
        with trio.move_on_after(timeout):
            proc = await trio.run_process(
                argv,
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
            return int(proc.returncode)
    return -1


def proc_cpu(pid: int) -> float:
    """user+sys CPU seconds of a live process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK
    except (OSError, IndexError):
        return 0.0


def nimbus_env(prefix: str, kafka: str, redis: str, partitions: int) -> dict[str, str]:
    """This environment plus what points a Nimbus process at the real brokers, on the run's own
    topics (`<prefix>-events` ...) and Redis namespace (`<prefix>:`), so runs never mix."""
    return {
        **os.environ,
        "NIMBUS_ENGINE": "real",
        "NIMBUS_KAFKA_BROKERS": kafka,
        "NIMBUS_REDIS_ADDRESS": redis,
        "NIMBUS_KAFKA_EVENTS_TOPIC": f"{prefix}-events",
        "NIMBUS_KAFKA_RESULTS_TOPIC": f"{prefix}-results",
        "NIMBUS_KAFKA_DLQ_TOPIC": f"{prefix}-dlq",
        "NIMBUS_KAFKA_PARTITIONS": str(partitions),
        "NIMBUS_REDIS_PREFIX": f"{prefix}:",
        "NIMBUS_HOST": HOST,
        "PYTHONUNBUFFERED": "1",
    }


@dataclass(eq=False)
class Proc:
    """One Nimbus process. Up once `marker` appears in its log after the last start."""

    name: str
    kind: str  # "pod" | "worker"
    module: str
    env: dict[str, str]
    log: Path
    marker: str
    args: list[str] = field(default_factory=list)
    port: int = 0
    # SIGKILLed by the kernel when the script dies, however it dies
    die_with_parent: bool = False
    # Each start first writes "===== <log_banner>: start #<n> at <wall> =====" to the log
    log_banner: str = ""
    popen: subprocess.Popen[bytes] | None = None
    ready: bool = False
    starts: int = 0
    started_at: float = 0.0  # trio time of the last start
    # Supervision (Fleet.kill, Fleet.supervise)
    restart_at: float = 0.0  # trio time: not (re)started before this
    killed: bool = False  # the current/last exit was ours
    kills: int = 0
    crashes: list[dict[str, Any]] = field(default_factory=list)
    streak: int = 0  # consecutive early exits (backoff)
    _log_pos: int = 0
    _tail: str = ""

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            if self.log_banner:
                out.write(
                    f"\n===== {self.log_banner}: start #{self.starts} at {wall()} =====\n".encode()
                )
                out.flush()
            self._log_pos = out.tell()
            self.popen = subprocess.Popen(
                [PY, "-m", self.module, *self.args],
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal reaches the script only
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        self.started_at = trio.current_time()
        self.killed = False
        self.ready = False
        self._tail = ""

    def check_ready(self) -> bool:
        """Read the log written since the start: has the process announced it is up?"""
        if self.ready or self.popen is None:
            return self.ready
        try:
            with self.log.open("rb") as f:
                f.seek(self._log_pos)
                chunk = f.read()
        except OSError:
            return False
        self._log_pos += len(chunk)
        text = self._tail + chunk.decode(errors="replace")
        if self.marker in text:
            self.ready = True
        self._tail = text[-200:]
        return self.ready

    def stop(self, grace: float = 20) -> None:
        """SIGTERM, and SIGKILL after `grace` seconds; returns when it has exited."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` (no wait); the exit is then ours, not a crash."""
        if self.popen is not None and self.popen.poll() is None:
            self.killed = True
            self.popen.send_signal(sig)

    def log_tail(self, lines: int = 8) -> list[str]:
        try:
            data = self.log.read_bytes()[-8000:].decode(errors="replace")
        except OSError:
            return []
        return data.splitlines()[-lines:]


class Fleet:
    """Pods and workers. Either started at once and stopped one by one (`start`, `stop`), or kept
    up by `supervise` (what dies is restarted) and stopped all at once (`stop_all`). Subclasses
    hear of starts, exits and readiness through `on_start`, `on_exit`, `on_ready`."""

    def __init__(self, procs: list[Proc]) -> None:
        self.procs = procs
        self.stopping = False

    @property
    def pods(self) -> list[Proc]:
        return [p for p in self.procs if p.kind == "pod"]

    @property
    def workers(self) -> list[Proc]:
        return [p for p in self.procs if p.kind == "worker"]

    @property
    def targets(self) -> list[str]:
        return [f"{HOST}:{p.port}" for p in self.pods]

    def up(self, kind: str) -> list[Proc]:
        return [p for p in self.procs if p.kind == kind and p.alive and p.ready]

    def all_ready(self) -> bool:
        return all(p.alive and p.ready for p in self.procs)

    def cpu(self) -> dict[str, float]:
        return {p.name: proc_cpu(p.pid) for p in self.procs if p.popen is not None}

    async def start(self, procs: list[Proc] | None = None, timeout: float = 120) -> None:
        """Start `procs` (default all) and wait until they are up. RuntimeError if one exits
        meanwhile, trio.TooSlowError after `timeout` s."""
        procs = self.procs if procs is None else procs
        for p in procs:
            p.start()
        with trio.fail_after(timeout):
            while not all(p.check_ready() for p in procs):
                for p in procs:
                    if p.popen is not None and p.popen.poll() is not None:
                        raise RuntimeError(f"{p.name} exited at start: see {p.log}")
                await trio.sleep(0.2)

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until every process is up; False after `timeout` s."""
        with trio.move_on_after(timeout):
            while not self.all_ready():
                for p in self.procs:
                    p.check_ready()
                await trio.sleep(0.2)
            return True
        return False

    def stop(self, procs: list[Proc] | None = None) -> None:
        """Stop `procs` (default all) one after the other (Proc.stop)."""
        for p in self.procs if procs is None else procs:
            p.stop()

    def kill(self, p: Proc, restart_after: float) -> None:
        """SIGKILL `p`; `supervise` starts it again `restart_after` s from now."""
        p.kill()
        p.kills += 1
        p.restart_at = trio.current_time() + restart_after

    async def supervise(self) -> None:
        """Every 0.2 s: reap exits, start what is due, notice readiness. Runs until cancelled or
        `stop_all`. A process that exits on its own is started again after 0.5 s, doubling up
        to 5 s while it keeps exiting within 20 s of its start; one killed by `kill` after the
        delay given there."""
        while not self.stopping:
            now = trio.current_time()
            for p in self.procs:
                if p.popen is not None and p.popen.poll() is not None:
                    rc = p.popen.returncode
                    uptime = now - p.started_at
                    was_ready = p.ready or p.check_ready()
                    p.ready = False
                    p.popen = None
                    if p.killed:
                        p.streak = 0
                    else:
                        p.streak = p.streak + 1 if uptime < 20 else 1
                        p.restart_at = now + min(5.0, 0.5 * 2 ** (p.streak - 1))
                        self.on_exit(p, rc, uptime, was_ready)
                if p.popen is None and now >= p.restart_at:
                    p.start()
                    self.on_start(p)
                elif p.popen is not None and not p.ready and p.check_ready():
                    self.on_ready(p)
            await trio.sleep(0.2)

    def on_start(self, p: Proc) -> None:
        """`supervise` started `p`."""

    def on_exit(self, p: Proc, rc: int, uptime: float, was_ready: bool) -> None:
        """`p` exited on its own (not killed) with `rc` after `uptime` s; was it up?"""

    def on_ready(self, p: Proc) -> None:
        """`supervise` saw `p` come up."""

    async def stop_all(self, grace: float) -> None:
        """SIGTERM everything, SIGKILL what is left after `grace` seconds."""
        self.stopping = True
        for p in self.procs:
            p.kill(signal.SIGTERM)
        with trio.move_on_after(grace):
            await wait_until(lambda: not any(p.alive for p in self.procs), 0.1)
        self.kill_now()

    def kill_now(self) -> None:
        """SIGKILL everything and reap it (at most 5 s each)."""
        for p in self.procs:
            if p.popen is not None:
                p.kill()
                try:
                    p.popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass


def pod(base: dict[str, str], prefix: str, i: int, run_dir: Path, **options: Any) -> Proc:
    """Pod `i` (`pod<i>`, python -m nimbus.server) on a free port, with the Redis channel
    `<prefix>-pod<i>`, logging to run_dir/pod<i>.log; `options` are Proc's."""
    port = free_port()
    env = {
        **base,
        "NIMBUS_PORT": str(port),
        "NIMBUS_REDIS_EVENTS_CHANNEL": f"{prefix}-pod{i}",
        "NIMBUS_INSTANCE_ID": f"pod{i}",
    }
    log = run_dir / f"pod{i}.log"
    return Proc(f"pod{i}", "pod", "nimbus.server", env, log, POD_READY, port=port, **options)


def worker(
    name: str, base: dict[str, str], run_dir: Path, marker: str, *args: str, **options: Any
) -> Proc:
    """A worker process `name` (python -m nimbus.workers `args`), logging to run_dir/<name>.log,
    up once `marker` (the log line of the last role it starts) is in its log."""
    env = {**base, "NIMBUS_INSTANCE_ID": name}
    log = run_dir / f"{name}.log"
    return Proc(name, "worker", "nimbus.workers", env, log, marker, args=list(args), **options)
