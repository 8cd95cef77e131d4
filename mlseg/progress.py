"""Progress lines for a job's log, where no progress bar is drawn.

A bar is drawn only where stderr is a terminal; in a log file (cron, ``nohup``, a Prefect
worker) a run of a whole study said nothing for hours, and a working run looked like a hung
one. :class:`ProgressLog` gives ``log`` a plain line at most every ``every_s`` seconds::

    segment: 120/2000 images (6%), 3 failed, 14 min elapsed, about 3 h 40 min left

and a last one at the end of a run of a minute or longer, so a shorter run stays silent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

#: Seconds between two lines: often enough to tell a working run from a hung one, a line of
#: about 80 bytes a minute (58 kB over a 12-hour run)
EVERY_S = 60.0


def duration(seconds: float) -> str:
    """``40 s``, ``14 min``, ``3 h 40 min``: as a log reader reads a run's length."""
    if round(seconds) < 60:
        return f"{max(0, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def counted(
    items: Sequence[T], verb: str, unit: str, log: Callable[[str], object], **kwargs: Any
) -> Iterator[T]:
    """``items``, with a :class:`ProgressLog` line to ``log`` now and then: each item is done
    when the loop asks for the next (a loop with nothing to skip or fail on)."""
    said = ProgressLog(verb, len(items), unit, log, **kwargs)
    for item in items:
        yield item
        said.step()
    said.close()


def shown(
    items: Sequence[T],
    verb: str,
    unit: str,
    log: Callable[[str], object] | None,
    *,
    bar: str | None = None,
    bar_unit: str = "it",
    leave: bool = True,
) -> Iterable[T]:
    """``items`` for a long loop: counted to ``log`` now and then where one is given
    (:func:`counted`: ``verb: 120/2000 <unit> ...``, a job's log), behind a progress bar
    titled ``bar`` where one is asked for (a terminal)."""
    seen: Iterable[T] = items if log is None else counted(items, verb, unit, log)
    if bar is None:
        return seen
    from tqdm.auto import tqdm

    return tqdm(seen, total=len(items), desc=bar, unit=bar_unit, leave=leave)


class ProgressLog:
    """Counts a run's items and says how far it is to ``log`` now and then.

    Call :meth:`step` after each item (``"done"``, ``"failed"`` or ``"skipped"``: already
    done by an earlier run) and :meth:`close` at the end. The time left is estimated from the
    items done or failed in this run, not those skipped, which take no time: a resumed run
    would otherwise promise its last hours in minutes. ``log`` None counts and says nothing.
    ``clock``: seconds, monotonic.
    """

    def __init__(
        self,
        verb: str,
        total: int,
        unit: str,
        log: Callable[[str], object] | None,
        *,
        every_s: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.verb, self.total, self.unit, self.log = verb, total, unit, log
        self.every_s, self.clock = every_s, clock
        self.done = self.failed = self.skipped = 0
        self.work_s = 0.0  # the time of the items done or failed, for the time left
        self.started = self.last = self.said = clock()
        self.lines = 0

    def step(self, outcome: str = "done") -> None:
        """Count one item; say how far the run is when ``every_s`` has passed since the last
        line."""
        now = self.clock()
        if outcome == "skipped":
            self.skipped += 1
        else:
            self.work_s += now - self.last
            self.failed += outcome == "failed"
            self.done += outcome != "failed"
        self.last = now
        if now - self.said >= self.every_s and self.count < self.total:
            self._say(now)

    @property
    def count(self) -> int:
        return self.done + self.failed + self.skipped

    def close(self) -> None:
        """The last line, with the run's length, where it ran ``every_s`` or longer (a short
        run stays silent): one whose images each took over a minute said nothing before its
        end, as a short one."""
        now = self.clock()
        if self.lines or now - self.started >= self.every_s:
            self._say(now)

    def _say(self, now: float) -> None:
        if self.log is None:
            return
        share = f"{100 * self.count // max(self.total, 1)}%"
        if self.skipped:
            share += f", {self.skipped} already done"
        parts = [f"{self.verb}: {self.count}/{self.total} {self.unit} ({share})"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        parts.append(f"{duration(now - self.started)} elapsed")
        worked = self.done + self.failed
        if worked and self.count < self.total:
            left = (self.total - self.count) * self.work_s / worked
            parts.append(f"about {duration(left)} left" if left >= 60 else "under a minute left")
        self.log(", ".join(parts))
        self.said = now
        self.lines += 1
