"""Resident memory of the benchmarking process, sampled in a thread, for per-phase peaks."""

from __future__ import annotations

import os
import threading
import time


def rss_mb() -> float:
    """Resident set size of this process, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class MemorySampler:
    """Samples the resident memory every ``period`` seconds in a daemon thread while recording.

    ``peak(intervals)`` is the largest sample inside the given ``time.perf_counter()`` intervals; a phase
    shorter than the period gets the memory in use when it ended (the last sample before its end).
    """

    def __init__(self, period: float = 0.002):
        self.period = period
        self.samples: list[tuple[float, float]] = []
        self._recording = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self._recording.wait()
            self.samples.append((time.perf_counter(), rss_mb()))
            time.sleep(self.period)

    def start(self) -> None:
        """Forget earlier samples and record from now on."""
        self.samples.clear()
        self.samples.append((time.perf_counter(), rss_mb()))
        self._recording.set()

    def stop(self) -> None:
        self._recording.clear()
        self.samples.append((time.perf_counter(), rss_mb()))

    def peak(self, intervals: list[tuple[float, float]]) -> float:
        samples = list(self.samples)
        peaks = []
        for a, b in intervals:
            inside = [mb for t, mb in samples if a <= t <= b]
            peaks.append(max(inside) if inside else max((mb for t, mb in samples if t <= b), default=float("nan")))
        return max(peaks, default=float("nan"))
