"""Wording shared by printed headers and messages; imports nothing heavy, so that command
modules can use it when their parsers are registered (``mim --help`` imports no torch)."""

from __future__ import annotations

from typing import Optional


def counted(count: int, noun: str, plural: Optional[str] = None) -> str:
    """``count`` (with thousands separators, as counts are printed elsewhere) and ``noun``, the
    noun plural unless the count is one (bench headers read "1 hosts" and "1 timed steps", mim
    train's batch-size refusal "on 1 ranks"; hand-written "rank(s)" read as unsure of the count).
    ``plural``: where it is not ``noun`` + "s" ("behaviour categories")."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"
