"""Timing helpers shared by the benchmarks: interleaved repeats, medians and spreads, threads.

Every comparison (ours vs theirs, with vs without vision) runs its cases *interleaved*: repeat
``r`` runs case A, then case B, then case C, so that a burst of load from other processes hits
all cases alike. Ratios are formed per repeat (``A_r / B_r``) and summarised by their median,
inter-quartile range and min-max; nothing here asserts on a time.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any


def stats(xs: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and min-max of ``xs`` (quartiles by linear interpolation)."""
    if not xs:
        raise ValueError("stats of an empty sequence")
    s = sorted(float(x) for x in xs)

    def q(p: float) -> float:
        k = (len(s) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {
        "median": statistics.median(s),
        "q1": q(0.25),
        "q3": q(0.75),
        "min": s[0],
        "max": s[-1],
        "n": len(s),
    }


def scaled(st: Mapping[str, float], factor: float) -> dict[str, float]:
    """``stats`` output with every value (not ``n``) multiplied by ``factor``."""
    return {k: (v if k == "n" else v * factor) for k, v in st.items()}


def interleaved(
    cases: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall seconds of each case per repeat, the cases run in turn within every repeat.

    A case may return a number: it is then taken as its own measurement (seconds) instead of
    the wall time of the call (for cases that time only part of what they do).
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            got = fn()
            dt = time.perf_counter() - t0
            out[name].append(float(got) if isinstance(got, int | float) else dt)
    return out


def ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-repeat ratios ``num[r] / den[r]``."""
    return [a / b for a, b in zip(num, den, strict=True)]


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[int]:
    """Run with ``n`` torch intra-op threads (None: leave as is); restored on exit."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def load() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages (other jobs make timings noisy)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return []


def peak_rss_mb() -> float:
    """This process' peak resident set size so far (MiB; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fmt_stats(st: Mapping[str, float], digits: int = 3) -> str:
    """``median [q1, q3] (min-max)`` for the markdown table."""
    f = f"{{:.{digits}g}}"
    return (
        f"{f.format(st['median'])} [IQR {f.format(st['q1'])}-{f.format(st['q3'])}, "
        f"range {f.format(st['min'])}-{f.format(st['max'])}, n={int(st['n'])}]"
    )


def rss_mb() -> float:
    """This process' resident set size now (MiB), from ``/proc/self/statm`` (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:  # pragma: no cover - not Linux
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssPeak:
    """Peak resident memory inside a ``with`` block, sampled by a thread every ``interval`` s.

    ``ru_maxrss`` cannot be reset, so a process that loaded data first would report the
    loading's peak; this measures the block alone: ``start_mib``, ``peak_mib``, ``increase_mib``.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start_mib = self.peak_mib = float("nan")
        self._stop = False

    def _run(self) -> None:
        while not self._stop:
            self.peak_mib = max(self.peak_mib, rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> RssPeak:
        import threading

        self.start_mib = self.peak_mib = rss_mb()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()
        self.peak_mib = max(self.peak_mib, rss_mb())

    @property
    def increase_mib(self) -> float:
        """Peak minus the resident size when the block started."""
        return self.peak_mib - self.start_mib
