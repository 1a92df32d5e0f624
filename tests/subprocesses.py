"""Starting l2a's commands as real processes in tests, without ever leaving one behind.

Each process starts in a session of its own, and on leaving ``spawned`` (normally, on a failed assertion or
on a timeout) the whole process group is killed: the command and anything it started (vLLM engine processes,
``accelerate launch`` workers).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def command_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


@contextlib.contextmanager
def spawned(args: list[str], *, ignore_sigint: bool = False, env: dict[str, str] | None = None, **popen):
    """``subprocess.Popen(args)`` in its own process group, killed with its children on the way out.

    ``ignore_sigint``: start it with SIGINT ignored, as a background job of a non-interactive shell (``cmd &``
    in a script, many CI runners) inherits it.
    """
    def start_new_group() -> None:
        os.setsid()
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    process = subprocess.Popen(args, cwd=REPO, env=env or command_env(), preexec_fn=start_new_group, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def run_to_end(args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run a command to its end (or kill it and its children after ``timeout`` seconds)."""
    with spawned(args, **kwargs) as process:
        stdout, stderr = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


@dataclass
class Stopped:
    """How a process ended after a signal: its stderr, the seconds it took, and the CPU seconds it used meanwhile
    (nan without /proc). Far less CPU than seconds means it was kept waiting, for a CPU on a loaded machine or on
    something it waited for."""
    stderr: str
    seconds: float
    cpu_seconds: float

    def timing(self) -> str:
        return (f"took {self.seconds:.1f} s to stop, using {self.cpu_seconds:.1f} s of CPU "
                f"(load average {load_average()})")


def stop_and_wait(process: subprocess.Popen, signum: int, within: float) -> Stopped:
    """Send ``signum`` and wait for the process to end. Fails if it takes over ``within`` s."""
    before = _cpu_seconds(process.pid)
    reaped_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the process did not end within {within} s of {signal.Signals(signum).name} "
                             f"(load average {load_average()})") from None
    seconds = time.monotonic() - started
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = math.nan if before is None else (
        reaped.ru_utime + reaped.ru_stime - reaped_before.ru_utime - reaped_before.ru_stime - before)
    return Stopped(stderr, seconds, cpu_seconds)


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process so far (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15 of stat


def load_average() -> str:
    return ", ".join(f"{load:.1f}" for load in os.getloadavg())


def wait_until(condition, timeout: float, process: subprocess.Popen | None = None, what: str = "condition") -> None:
    """Poll ``condition()`` every 50 ms; fail after ``timeout`` s or if ``process`` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (exit {process.returncode}) before {what}: "
                                 f"{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} ({timeout} s; load average {load_average()})")
        time.sleep(0.05)
