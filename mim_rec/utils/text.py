"""Wording shared by printed headers and messages; imports nothing heavy, so that command
modules can use it when their parsers are registered (``mim --help`` imports no torch)."""

from __future__ import annotations


def counted(count: int, noun: str) -> str:
    """``count`` and ``noun``, the noun plural unless the count is one (bench headers read
    "1 hosts" and "1 timed steps", mim train's batch-size refusal "on 1 ranks")."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
