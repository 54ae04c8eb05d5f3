"""Titles and search queries: words that name what the image shows, plus noise.

A title mixes a brand, the style's colour (with synonyms), brightness, stripe pattern and
size words, the category noun and marketplace noise words; any style word may be missing
(titles are written by sellers, not by the generator). Queries name a colour and a
category noun. The vocabulary is derived from the same style coordinates the renderer uses,
so text and image agree about an item without being copies of each other.
"""

from __future__ import annotations

import itertools
from typing import List

import numpy as np

from mim_rec.data.synth.render import _sigmoid, style_hue

COLOURS = (("red", "crimson"), ("orange", "tangerine"), ("amber", "golden"), ("yellow", "lemon"),
           ("lime", "chartreuse"), ("green", "emerald"), ("teal", "jade"), ("cyan", "aqua"),
           ("blue", "azure"), ("indigo", "navy"), ("violet", "purple"), ("magenta", "fuchsia"),
           ("pink", "rose"))
CATEGORY_NOUNS = (("dress", "gown"), ("sneaker", "trainer"), ("handbag", "purse"), ("mug", "cup"),
                  ("lamp", "lantern"), ("backpack", "rucksack"), ("watch", "timepiece"), ("sofa", "couch"),
                  ("jacket", "coat"), ("hat", "cap"), ("vase", "jar"), ("scarf", "shawl"),
                  ("phone case", "phone cover"), ("pillow", "cushion"), ("bottle", "flask"),
                  ("rug", "carpet"), ("clock", "wall clock"), ("umbrella", "parasol"),
                  ("notebook", "journal"), ("headphones", "earphones"))
BRIGHTNESS = (("dark", "deep"), (), ("light", "pale"))
PATTERNS = (("wide-striped", "bold stripe"), ("striped", "stripe"), ("pinstripe", "fine-striped"))
SIZES = (("mini", "compact"), (), ("large", "oversized"))
NOISE = ("new", "2026", "hot", "sale", "free shipping", "official", "authentic", "gift",
         "premium", "classic", "trendy", "best seller", "limited", "original", "quality")
_SYLLABLES = ("ka", "lo", "mi", "ra", "ven", "zu", "tor", "ell", "qui", "no", "sa", "dex", "ori", "pa")


def category_nouns(category: int) -> tuple:
    """The nouns (with synonyms) of a category; categories beyond the list get a series number."""
    nouns = CATEGORY_NOUNS[category % len(CATEGORY_NOUNS)]
    series = category // len(CATEGORY_NOUNS)
    return nouns if series == 0 else tuple(f"{n} series{series}" for n in nouns)


def _possible_brand_names() -> int:
    """How many distinct names two or three syllables spell (some spellings coincide)."""
    return len({"".join(parts) for size in (2, 3) for parts in itertools.product(_SYLLABLES, repeat=size)})


BRAND_NAME_LIMIT = _possible_brand_names()


def brand_names(count: int, rng: np.random.Generator) -> List[str]:
    """Distinct pronounceable brand names (at most :data:`BRAND_NAME_LIMIT`: the draw below
    would never end past it)."""
    if count > BRAND_NAME_LIMIT:
        raise ValueError(f"{count} brand names asked for; two or three syllables spell {BRAND_NAME_LIMIT}")
    names: List[str] = []
    seen = set()
    while len(names) < count:
        name = "".join(rng.choice(_SYLLABLES, size=rng.integers(2, 4))).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def colour_bin(styles: np.ndarray) -> np.ndarray:
    return np.floor(style_hue(styles) * len(COLOURS)).astype(int) % len(COLOURS)


def _level(x: np.ndarray) -> np.ndarray:
    """0/1/2 for low/middle/high of a squashed style coordinate."""
    return np.digitize(_sigmoid(3 * x), [1 / 3, 2 / 3])


def titles(styles: np.ndarray, categories: np.ndarray, brands: List[str], brand_ids: np.ndarray,
           rng: np.random.Generator, drop: float = 0.15) -> List[str]:
    """One title per item; each style word is dropped with probability ``drop``."""
    colours, light, pattern, size = (colour_bin(styles), _level(styles[:, 2]),
                                     _level(styles[:, 4]), _level(styles[:, 3]))
    out = []
    for i in range(len(styles)):
        def pick(words: tuple) -> List[str]:
            return [str(rng.choice(words))] if words and rng.random() >= drop else []

        words = [brands[brand_ids[i]]]
        words += list(rng.choice(NOISE, size=rng.integers(0, 3), replace=False))
        words += pick(BRIGHTNESS[light[i]]) + pick(COLOURS[colours[i]]) + pick(PATTERNS[pattern[i]])
        words += pick(SIZES[size[i]]) + [str(rng.choice(category_nouns(int(categories[i]))))]
        words += list(rng.choice(NOISE, size=rng.integers(0, 2), replace=False))
        out.append(" ".join(words))
    return out


def queries(wanted: np.ndarray, categories: np.ndarray, rng: np.random.Generator) -> List[str]:
    """Search queries: usually a colour plus a category noun, sometimes the noun alone."""
    colours = colour_bin(wanted)
    out = []
    for i in range(len(wanted)):
        noun = str(rng.choice(category_nouns(int(categories[i]))))
        out.append(noun if rng.random() < 0.3 else f"{rng.choice(COLOURS[colours[i]])} {noun}")
    return out
