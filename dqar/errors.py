"""User-facing errors: one line naming the problem and the fix; libraries' multi-line log noise kept out of it."""
from __future__ import annotations

import contextlib
import logging


class DqarError(Exception):
    """Bad input or an unusable resource; the CLI prints it on one line and exits with code 2."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none), for one-line reports."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR):
    """Raise logger `name` to `level` inside the block (a library's own warnings where dqar reports in one line)."""
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)
