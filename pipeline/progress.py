"""Progress reporting for long jobs: a tqdm bar on a TTY, periodic log lines otherwise.

Scheduled jobs run without a terminal; a bar there only fills log files with carriage returns,
so off a TTY we log a line every `log_every` seconds instead (and always a final summary). While a
bar is shown, log lines are printed through it (tqdm's logging redirect), so neither is torn.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("mtrank")


class Progress:
    """Counts units of work; `update(n, **postfix)` is cheap enough to call once per batch."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "rows",
                 log_every: float = 30.0, enabled: bool | None = None):
        self.desc, self.total, self.unit, self.log_every = desc, total, unit, log_every
        self.count = 0
        self._t0 = self._last_log = time.perf_counter()
        tty = sys.stderr.isatty() if enabled is None else enabled
        self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                         leave=False, file=sys.stderr) if tty else None
        self._redirect = None
        if self._bar is not None:
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])
            self._redirect.__enter__()
        self._postfix: dict[str, Any] = {}

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.count += n
        if postfix:
            self._postfix = postfix
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_log >= self.log_every:
            self._last_log = now
            log.info("%s", self._line(now))

    def _line(self, now: float) -> str:
        rate = self.count / max(now - self._t0, 1e-9)
        done = f"{self.count:,}" + (f"/{self.total:,}" if self.total else "")
        extra = " ".join(f"{k}={v}" for k, v in self._postfix.items())
        return f"{self.desc}: {done} {self.unit} ({rate:,.0f} {self.unit}/s) {extra}".rstrip()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        log.info("%s", self._line(time.perf_counter()))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
