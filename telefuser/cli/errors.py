"""Turning user errors into one paragraph on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable

from telefuser.errors import TeleFuserError

USAGE_ERROR = 2


def report(prog: str, message: str) -> int:
    print(textwrap.fill(f"{prog}: error: {message}", width=100, break_long_words=False, break_on_hyphens=False),
          file=sys.stderr)
    return USAGE_ERROR


def guarded(prog: str, body: Callable[[], int]) -> int:
    try:
        return body()
    except TeleFuserError as exc:
        return report(prog, str(exc))
    except KeyboardInterrupt:
        return report(prog, "interrupted; nothing was written.")
