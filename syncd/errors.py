"""Exceptions that reach the CLI, each with the exit code SPEC §3 gives it.

Library code raises these; only `cli.py` turns them into one line and an exit code.
"""

from __future__ import annotations


class SyncdError(Exception):
    """Base class: a failure with a one-line, user-facing message."""

    exit_code = 1


class ConfigError(SyncdError):
    """Bad config or usage: exit 2."""

    exit_code = 2
    log_format: str | None = None  # what the rejected config asks for, if it says (SPEC §2: JSON lines)


class LedgerError(SyncdError):
    """The ledger cannot be used (corrupt, locked by a daemon): exit 2."""

    exit_code = 2


class RemoteUnavailable(SyncdError):
    """The remote cannot be used at all: unreachable, bad credentials, no bucket: exit 3."""

    exit_code = 3


class PartialFailure(SyncdError):
    """The remote works but some files failed: exit 1."""

    exit_code = 1


class LedgerCorrupt(LedgerError):
    """SQLite says the ledger file is malformed (the only case called corrupt, SPEC §4.11)."""


class LedgerUnwritable(LedgerError):
    """The ledger cannot be opened or written: full disk, read-only directory, I/O error (§4.11)."""


class Interrupted(SyncdError):
    """SIGINT or SIGTERM stopped a one-shot command after a clean stop (SPEC §3, §4.10): 130."""

    exit_code = 130

