"""Progress bars for ``run``, ``arun``, ``map`` and ``amap`` (``progress=True``).

A bar is a ``tqdm.auto`` bar (a widget in Jupyter, text in a terminal): tqdm is an
optional extra, imported only when a bar is asked for. It counts what has finished,
nodes or map items, whatever their status; failures and skips are counted apart in
its postfix, and the bar turns red at the first failure, so that a PARTIAL or FAILED
run never ends green (tqdm's notebook bar ends green whenever it is full). While a
node runs, its ``ctx.progress(done, total)`` moves the bar by that fraction of a node,
so a plan of a few long actions does not sit still; the count shown stays the whole
nodes finished.

Threads: a run's bar is driven by its ``on_event`` calls, on the runner's scheduler
thread; a map's by the thread that iterates the map (the event loop's, for ``amap``);
``close`` comes from that same thread, or from the one that awaited the run once it
has ended. One bar is never driven by two threads at once, so it takes no lock.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from .events import Event
from .outcome import Status

__all__ = ["Bar", "EventBar", "need_tqdm"]

_FAILED = frozenset(
    {Status.FAILED, Status.TIMED_OUT, Status.CRASHED, Status.CANCELLED, Status.IN_DOUBT}
)
"""Statuses that turn a bar red (SKIPPED does not: a skip follows a failure, which
already did, or a ``validate`` that said no, which is not one)."""


def need_tqdm() -> Any:
    """``tqdm.auto.tqdm``.

    Raises:
        ImportError: tqdm is not installed (``name="tqdm"``); the message gives the
            ``pip install 'actionpool[progress]'`` hint.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError(
            "progress=True needs tqdm: pip install 'actionpool[progress]'", name="tqdm"
        ) from exc
    return tqdm


@cache
def _counted(tqdm: type) -> type:
    """``tqdm`` with one more field for its ``bar_format``, ``{done}``: the whole nodes
    or items finished, while ``n`` (what fills the bar) also holds the fractions of
    running nodes."""

    class Counted(tqdm):  # type: ignore[misc]
        done = 0

        @property
        def format_dict(self) -> dict[str, Any]:
            return {**super().format_dict, "done": self.done}

    return Counted


_FORMAT = "{l_bar}{bar}| {done}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]"
_FORMAT_UNSIZED = "{desc}: {done} {unit} [{elapsed}{postfix}]"


class Bar:
    """A progress bar over ``total`` nodes or items (``None``: unknown, a counter).

    Args:
        total: how many will finish, or ``None`` when unknown (an endless map).
        unit: what is counted, ``"nodes"`` or ``"items"``.
        desc: the bar's label.

    Raises:
        ImportError: tqdm is not installed (see :func:`need_tqdm`).
    """

    def __init__(self, total: int | None, unit: str, desc: str) -> None:
        cls = _counted(need_tqdm())
        fmt = _FORMAT if total is not None else _FORMAT_UNSIZED
        self.failed = 0
        self.skipped = 0
        self.running: dict[Any, float] = {}  # node -> its ctx.progress fraction
        self.tqdm = cls(total=total, unit=unit, desc=desc, bar_format=fmt)

    @property
    def done(self) -> int:
        """How many have finished, whatever their status."""
        return int(self.tqdm.done)

    def finished(self, count: int = 1, failed: int = 0, skipped: int = 0) -> None:
        """``count`` more have finished, ``failed`` and ``skipped`` of them so."""
        self.tqdm.done += count
        if failed or skipped:
            if failed and not self.failed:
                self.turn_red()
            self.failed += failed
            self.skipped += skipped
            parts = [f"{self.failed} failed"] if self.failed else []
            parts += [f"{self.skipped} skipped"] if self.skipped else []
            self.tqdm.set_postfix_str(", ".join(parts), refresh=False)
        self._move()

    def fraction(self, key: Any, value: float | None) -> None:
        """A running node's own progress, from 0 to 1 (``None``: it has ended)."""
        if value is None:
            self.running.pop(key, None)
        else:
            self.running[key] = min(1.0, max(0.0, value))
            self._move()

    def _move(self) -> None:
        # update() draws at most every mininterval seconds: a run of many quick
        # nodes does not redraw (or, in Jupyter, send a widget message) per node
        target = self.done + sum(self.running.values())
        self.tqdm.update(target - self.tqdm.n)

    def turn_red(self) -> None:
        """Colour the bar red: something failed (also a map's error that ended it)."""
        self.tqdm.colour = "red"
        # tqdm's notebook bar closes as "success" (green) whenever it is full, unless
        # its style is "danger" already
        if hasattr(self.tqdm, "container"):
            self.tqdm.disp(bar_style="danger", check_delay=False)

    def close(self) -> None:
        """Draw the final count and close the bar (idempotent)."""
        self.running.clear()
        self.tqdm.n = self.done
        self.tqdm.refresh()
        self.tqdm.close()


class EventBar:
    """An ``on_event`` wrapper that drives a :class:`Bar` over a run's nodes, then
    calls the user's own ``on_event`` (if any).

    Raises:
        ImportError: tqdm is not installed (see :func:`need_tqdm`).
    """

    def __init__(self, inner: Callable[[Event], Any] | None, total: int) -> None:
        self.inner = inner
        self.bar = Bar(total, "nodes", "actionpool")

    def __call__(self, event: Event) -> None:
        kind = event.kind
        if kind == "finished":
            self.bar.fraction(event.node, None)
            status = event.data
            self.bar.finished(1, int(status in _FAILED), int(status == Status.SKIPPED))
        elif kind == "progress":
            done, total = event.data
            if total:
                self.bar.fraction(event.node, done / total)
        if self.inner is not None:
            self.inner(event)

    def close(self) -> None:
        self.bar.close()
