"""How many threads the decode kernels use, chosen by measurement while serving.

On an otherwise idle machine all of torch's threads are best. When other processes hold
some cores, a full-width OpenMP team is the worst choice: every barrier of a step waits
for a thread the OS has descheduled, and a step's dozens of barriers add up (2 cores, one
busy process: SmolLM2 decode 20 tok/s on two threads, 79 on one). The tuner keeps timing
the steps it serves; every so often it runs a few steps at a neighbouring thread count
(half or double) and keeps whichever was faster by a margin. A probe that loses doubles
the wait before the next one, so on a quiet machine probing costs next to nothing.

Steps are compared only with steps of the same shape (the caller's ``key``: e.g. the
number of tokens), and the thread count never changes results: the kernels give each
output to one thread whatever the count.
"""
from __future__ import annotations

from collections import deque


def _median(xs) -> float:
    # Not statistics.median: that module (decimal, fractions) costs every model load ~5 ms.
    v = sorted(xs)
    h = len(v) // 2
    return v[h] if len(v) % 2 else 0.5 * (v[h - 1] + v[h])


class ThreadTuner:
    def __init__(self, max_threads: int, probe_len: int = 3, base_interval: int = 32,
                 max_interval: int = 4096, margin: float = 0.15, first_probe: int = 8):
        self.levels = sorted({max(1, max_threads >> i) for i in range(max_threads.bit_length())})
        self.cur = self.levels[-1]
        self.probe_len, self.margin = probe_len, margin
        self.base_interval, self.max_interval = base_interval, max_interval
        self.interval = base_interval
        self.countdown = first_probe   # the first comparison comes early
        self.recent: deque = deque(maxlen=4 * probe_len)   # (key, seconds) at self.cur
        self.alt: int | None = None                         # thread count being probed
        self.probe_key = None
        self.probe_times: list[float] = []
        self._go_up = False

    def _neighbour(self) -> int | None:
        i = self.levels.index(self.cur)
        down = self.levels[i - 1] if i > 0 else None
        up = self.levels[i + 1] if i + 1 < len(self.levels) else None
        if down is None or up is None:
            return down if up is None else up
        self._go_up = not self._go_up
        return up if self._go_up else down

    def pick(self, key) -> int:
        """Threads for the next step of shape ``key``."""
        if self.alt is not None:
            if key == self.probe_key:
                return self.alt
            self._end_probe(switch=False)   # the shape changed: this probe cannot be judged
        self.countdown -= 1
        if self.countdown <= 0 and len(self.recent) >= self.probe_len:
            same = sum(1 for k, _ in self.recent if k == key)
            alt = self._neighbour() if same >= self.probe_len else None
            if alt is not None:
                self.alt, self.probe_key, self.probe_times = alt, key, []
                return alt
        return self.cur

    def record(self, key, seconds: float) -> None:
        """The wall time of a step run with the count ``pick(key)`` returned."""
        if self.alt is not None and key == self.probe_key:
            self.probe_times.append(seconds)
            if len(self.probe_times) >= self.probe_len:
                base = [t for k, t in self.recent if k == key][-self.probe_len:]
                won = _median(self.probe_times) < (1.0 - self.margin) * _median(base)
                self._end_probe(switch=won)
            return
        self.recent.append((key, seconds))

    def _end_probe(self, switch: bool) -> None:
        if switch:
            self.cur = self.alt
            self.recent.clear()
            self.interval = self.base_interval
        else:
            self.interval = min(2 * self.interval, self.max_interval)
        self.countdown = self.interval
        self.alt, self.probe_key, self.probe_times = None, None, []
