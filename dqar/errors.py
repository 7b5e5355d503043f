"""User-facing errors: one line naming the problem and the fix."""


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
