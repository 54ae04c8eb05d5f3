"""The kinds of missing source rows an importer may fill with counted defaults instead of
refusing the import (``mim data import --allow-missing KINDS``), per format.

Each kind is admitted on its own: a user who accepts items without an embedding in the
behaviour lists need not also accept sample users without features. The module imports
nothing heavy, so ``mim data import --help`` lists the kinds without loading an importer.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

ALL = "all"
"""``--allow-missing all`` (also what a bare ``--allow-missing`` means): every kind of the format."""

# format -> kind -> the default that fills a missing row of that kind (docs/data.md says more)
MISSING_KINDS: Dict[str, Dict[str, str]] = {
    "taobao-mm": {
        "target-embedding": "a sample's item without an SCL embedding row: a zero MM-table row and "
                            "image_feature",
        "behaviour-embedding": "a behaviour item without an SCL embedding row: a zero MM-table row "
                               "and image_feature",
        "item-features": "a sample's item without an item_features row: its category from the "
                         "behaviour lists, else 0 (unknown); title '205=<id>'",
        "user-features": "a sample's user without a user_features row: an empty history",
    },
    "amazon": {
        "text": "an item of item2index without a .text line: its ASIN as its text",
        "inter-rows": "rows missing from the .inter files (a user without a valid or test row, an "
                      "interaction no row has as its target): counted, and a later row may extend "
                      "a sequence by more than one item",
    },
}


def admitted_kinds(value: Optional[str], fmt: Optional[str] = None) -> Tuple[str, ...]:
    """The kinds of ``fmt`` (every format's when None: while the command line is parsed, before
    the format is known) that ``--allow-missing VALUE`` admits, in their order above: none when
    the flag is absent (``None``), every one for ``all``, else those of the comma list. An
    empty or unknown name is a :class:`~mim_rec.config.ConfigError` naming it and listing the
    kinds there are."""
    formats = list(MISSING_KINDS) if fmt is None else [fmt]
    kinds = [kind for each in formats for kind in MISSING_KINDS[each]]
    if value is None:
        return ()
    if value == ALL:
        return tuple(kinds)
    named = [name.strip() for name in value.split(",")]
    _refuse_unknown(named, formats, f"--allow-missing {value}", f"give a comma list of them, or {ALL} for every kind")
    return tuple(kind for kind in kinds if kind in named)


def check_kinds(kinds: Sequence[str], fmt: str) -> Tuple[str, ...]:
    """``kinds`` (an importer's ``allow_missing`` option, given through the Python API rather
    than the command line) as a tuple, each a kind of ``fmt``; a misspelt kind would otherwise
    admit nothing and refuse the import with a remedy that names the right spelling."""
    if isinstance(kinds, str):  # a bare string would be read letter by letter
        kinds = (kinds,)
    _refuse_unknown(kinds, [fmt], f"allow_missing={tuple(kinds)}", "give a tuple of them")
    return tuple(kinds)


def _refuse_unknown(named: Sequence[str], formats: Sequence[str], given: str, remedy: str) -> None:
    """Raise a ConfigError for the first of ``named`` that is no kind of ``formats``."""
    from mim_rec.config import ConfigError  # here: the command's help imports this module

    kinds = {kind for each in formats for kind in MISSING_KINDS[each]}
    for name in named:
        if name not in kinds:
            listed = "; ".join(f"--format {each}: {', '.join(MISSING_KINDS[each])}" for each in formats)
            raise ConfigError(f"{given}: {name!r} is not a kind of missing row ({listed}; {remedy})")
