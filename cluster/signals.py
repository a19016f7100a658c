"""SIGINT and SIGTERM as a clean stop: the run unwinds (the workers are shut down, the cluster
too) and the CLI says so in one line, exiting 130 or 143 as a shell expects.

Ray installs its own SIGTERM handler in ``ray.init`` (it aborts the driver, rc -6, no output), so
:meth:`StopOnSignals.install` is called again once the cluster is up.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM. A BaseException, like KeyboardInterrupt,
    so that ``except Exception`` on the way does not swallow it. ``partial`` holds what was
    generated so far, where the engine had started."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.partial: list = []
        super().__init__(f"interrupted by {self.name}")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignals:
    """Context manager: SIGINT/SIGTERM raise :class:`Interrupted` while inside; the previous
    handlers come back on exit. Only the first signal interrupts; later ones are ignored while
    the run unwinds, so a second Ctrl-C does not cut the shutdown short."""

    def __init__(self) -> None:
        self._old: dict[int, object] = {}
        self._fired = False

    def _handle(self, signum, frame) -> None:
        if self._fired:
            return
        self._fired = True
        raise Interrupted(signum)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in SIGNALS:
            old = signal.signal(s, self._handle)
            self._old.setdefault(s, old)

    def __enter__(self) -> StopOnSignals:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


__all__ = ["Interrupted", "StopOnSignals"]
