"""The errors a user sees as one line (``error: ...``) and an exit code, instead of a traceback.

``python -m lit_wuerstchen`` prints the first of these it finds in an exception's chain (jsonargparse and Lightning
wrap what they call) and exits with its ``exit_code``; ``LIT_WUERSTCHEN_TRACEBACK=1`` shows the full traceback
instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class LitWuerstchenError(Exception):
    """Base of the errors reported as one line; ``exit_code`` is the process's exit status."""

    exit_code = 1


class ConfigError(LitWuerstchenError, ValueError):
    """Bad input found before or while starting a run: a config value, a missing or wrong file, an output path
    that would overwrite something. Exit status 2."""

    exit_code = 2


class CheckpointError(ConfigError):
    """A checkpoint or weights file that cannot be used; the message names the file and what was expected."""


class DivergenceError(LitWuerstchenError, RuntimeError):
    """Training produced non-finite values; the message names the step and the value. Exit status 1."""


class PreemptedError(LitWuerstchenError):
    """The run was stopped by a signal (SIGTERM, SIGUSR1) after saving its checkpoint. Exit status 143, as for a
    process ended by SIGTERM, so schedulers see an interrupted job, not a finished one."""

    exit_code = 143


def first_line(error: BaseException) -> str:
    """The gist of a library's error: the first sentence of its first line."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(error).__name__


def user_error(error: BaseException | None) -> LitWuerstchenError | None:
    """The first :class:`LitWuerstchenError` in ``error``'s chain of causes and contexts, if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, LitWuerstchenError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def show_tracebacks() -> bool:
    """``LIT_WUERSTCHEN_TRACEBACK=1``: let errors propagate with their full traceback."""
    return os.environ.get("LIT_WUERSTCHEN_TRACEBACK", "").strip().lower() in {"1", "true", "yes"}


def guarded(command: Callable[[object], int], args: object) -> int:
    """Run a command (sample, export, convert): missing or wrong checkpoints and files end with a one-line error and
    exit status 2, not a traceback."""
    try:
        return command(args)
    except (FileNotFoundError, ValueError, LitWuerstchenError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
