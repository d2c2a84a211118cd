"""Errors a user can cause, each ending as one clear line and a documented exit code.

    >>> from ftcli.errors import ConfigError
    >>> raise ConfigError("--learning-rate must be > 0 (got -1.0)", hint="pass a positive value such as 1e-4")

The CLI catches `FtcliError`, prints `error: <message> (<hint>)` and exits with `exit_code`.
Anything else is a bug in ftcli and keeps its traceback (shown in full with `--debug`).
"""

from __future__ import annotations

# Exit codes are part of the interface: scripts branch on them. Keep in sync with README.
EXIT_FAILED = 1  # the run itself failed (training error, non-finite loss, ...)
EXIT_CONFIG = 2  # bad flags, bad config file, bad combination of options
EXIT_DATA = 3  # dataset missing, unreadable or malformed
EXIT_MODEL = 4  # model or tokenizer missing, unreachable or unusable
EXIT_OUTPUT = 5  # output folder refused (not empty, not writable)
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C / SIGTERM


class FtcliError(Exception):
    """A problem the user can fix: what went wrong, and how to fix it."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message if not self.hint else f"{self.message}; {self.hint}"
        return " ".join(text.split())


class ConfigError(FtcliError):
    exit_code = EXIT_CONFIG


class DataError(FtcliError):
    exit_code = EXIT_DATA


class ModelError(FtcliError):
    exit_code = EXIT_MODEL


class OutputError(FtcliError):
    exit_code = EXIT_OUTPUT


class RunFailed(FtcliError):
    exit_code = EXIT_FAILED
