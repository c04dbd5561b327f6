"""The two kinds of failure a user can see.

Every failure that reaches the user is one line on stderr that names the problem and the fix,
and a non-zero exit code: 2 for usage errors (bad flags, bad recipe, bad names), 1 for runtime
failures (bad files, NaN, full disk). The CLI turns these exceptions into that line; library
code raises them and never prints.
"""

from __future__ import annotations


class CnnexplainError(Exception):
    """A runtime failure (exit code 1): ``problem`` says what went wrong, ``fix`` what to do."""

    exit_code = 1

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = " ".join(str(problem).split())
        self.fix = " ".join(str(fix).split()) if fix else None
        super().__init__(self.line())

    def line(self) -> str:
        """The one line shown to the user."""
        return f"{self.problem}; {self.fix}" if self.fix else self.problem


class UsageError(CnnexplainError):
    """A usage error (exit code 2): a bad option value, name, recipe key or combination."""

    exit_code = 2


def close_matches(word: str, candidates, n: int = 3) -> str:
    """A ``did you mean`` suffix listing the candidates closest to ``word`` (may be empty)."""
    import difflib

    candidates = [str(c) for c in candidates]
    hits = difflib.get_close_matches(word, candidates, n=n, cutoff=0.5)
    if not hits:
        hits = [c for c in candidates if word and (word in c or c in word)][:n]
    return f" (did you mean {', '.join(repr(h) for h in hits)}?)" if hits else ""
