"""One error type for every bad input, so users always learn *where* the problem is."""

from __future__ import annotations

from typing import Optional


class DataError(ValueError):
    """Bad input data, located by file, row and field.

    ``row`` is the 0-based row index within the file (``None`` for file-level problems
    such as a missing column); ``field`` is the column name.
    """

    def __init__(self, file: str, message: str, row: Optional[int] = None,
                 field: Optional[str] = None) -> None:
        self.file, self.row, self.field, self.reason = str(file), row, field, message
        where = [self.file]
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}")


class ManifestMismatch(ValueError):
    """An artifact was produced by something other than what the consumer expects
    (another encoder, another id space, another dimension...)."""
