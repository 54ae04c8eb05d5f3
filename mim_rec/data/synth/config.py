"""Every knob of the synthetic world, with the defaults `mim data synth` uses."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import date

from mim_rec.config import ConfigError
from mim_rec.data.synth.text import BRAND_NAME_LIMIT

# The renderer draws eight style coordinates (hue from s0/s1, brightness, size, stripe frequency
# and angle, stripe colour, backdrop: docs/synth.md), so a world needs at least that many.
RENDERED_STYLE_DIMS = 8
MAX_IMAGE_SIZE = 1024             # pixels; the encoders resize to 224
MAX_PAGE_SIZE = 2 ** 15 - 1       # the events contract's int16 position


@dataclass
class ClickModel:
    """Weights of the click logit (see :mod:`mim_rec.data.synth.world`).

    ``logit = bias + content * cos(wanted, style) + category * [item in query category]
    + item_effect + collaborative + position * log1p(rank) + noise``.
    """

    bias: float = -3.8
    content: float = 3.0            # content interest: visible in images and titles
    category: float = 0.6           # the item matches the category the user searched
    item_effect_std: float = 0.8    # ID-level quality/popularity the content does not show
    collaborative_std: float = 0.7  # user-group x item-group affinity, invisible in content
    position: float = -0.35         # per log1p(rank): users click the top of the page more
    noise_std: float = 0.5          # per-impression noise on the logit


@dataclass
class SynthConfig:
    """Sizes, latent dimensions, time line and click model of the world."""

    seed: int = 0
    items: int = 20_000
    users: int = 5_000
    categories: int = 20
    brands: int = 300
    style_dim: int = 8
    image_size: int = 64
    events: int = 500_000            # impressions, train + test
    page_size: int = 10              # impressions per search session
    pairs_train: int = 20_000        # C-SFT <query image, item> pairs
    pairs_test: int = 2_000
    # Visual search (C-SFT pairs): the engine ranks a category's items by
    # ``search_sharpness * cos(wanted, style) + Gumbel noise`` and shows ``search_results``.
    search_sharpness: float = 6.0
    search_results: int = 10
    mean_history: float = 40.0       # behaviours per user over the whole time line
    max_history: int = 400
    cf_groups: int = 8               # latent user/item groups of the collaborative effect
    style_spread: float = 0.7        # item style = category centroid + spread * noise
    taste_spread: float = 0.7        # user taste around each category centroid
    session_noise: float = 0.35      # a session's wanted style around the user's taste
    days_before: int = 365           # half the catalogue is created in the year before t0
    days: int = 180                  # the observed time line [t0, t0 + days)
    event_days: int = 60             # search sessions happen in the last event_days
    test_days: int = 8               # the last test_days are the test split
    t0: str = "2026-01-01"
    click: ClickModel = field(default_factory=ClickModel)

    def __post_init__(self) -> None:
        """Refuse a world the generator cannot draw, naming the field, before any sampling
        fails deep inside numpy with an index or bounds error."""
        at_least = {"items": 1, "users": 1, "categories": 1, "brands": 1, "cf_groups": 1,
                    "style_dim": RENDERED_STYLE_DIMS, "image_size": 8, "page_size": 1, "pairs_train": 1,
                    "pairs_test": 1, "search_results": 1, "max_history": 3, "days": 1, "test_days": 1}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"{name}={getattr(self, name)}: must be at least {low}")
        if self.image_size > MAX_IMAGE_SIZE:
            raise ConfigError(f"image_size={self.image_size}: at most {MAX_IMAGE_SIZE} (the vision towers read "
                              "224-pixel inputs; a larger render only costs memory and disk)")
        if self.brands > BRAND_NAME_LIMIT:  # the name draw would loop forever
            raise ConfigError(f"brands={self.brands}: the title generator spells at most {BRAND_NAME_LIMIT} "
                              "distinct brand names")
        if self.categories > self.items:
            raise ConfigError(f"categories={self.categories} exceeds items={self.items}: a category needs an item")
        # the affinity matrix is cf_groups x cf_groups: a million groups asked numpy for 7 TiB.
        # More groups than users (or items) only leaves some empty, so a world of 3 users stays.
        if self.cf_groups > max(self.users, self.items):
            raise ConfigError(f"cf_groups={self.cf_groups} exceeds both users={self.users} and items={self.items}: "
                              "most collaborative groups would hold no one")
        if self.page_size > MAX_PAGE_SIZE:
            raise ConfigError(f"page_size={self.page_size}: at most {MAX_PAGE_SIZE} (an event's position is "
                              "an int16)")
        if self.events < 2 * self.page_size:
            raise ConfigError(f"events={self.events}: need at least two pages of page_size={self.page_size} "
                              "(one for the train split, one for the test split)")
        if not self.test_days < self.event_days <= self.days:
            raise ConfigError(f"need test_days < event_days <= days, got test_days={self.test_days}, "
                              f"event_days={self.event_days}, days={self.days}")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed}: must be at least 0 (numpy's generators take no negative seed)")
        if self.days_before < 1:
            raise ConfigError(f"days_before={self.days_before}: must be at least 1 (half the catalogue "
                              "is created in the days before t0)")
        floats = {name: getattr(self, name) for name in
                  ("search_sharpness", "mean_history", "style_spread", "taste_spread", "session_noise")}
        floats.update({f"click.{name}": value for name, value in vars(self.click).items()})
        for name, value in floats.items():
            if not math.isfinite(value):
                raise ConfigError(f"{name}={value}: must be a finite number")
        if self.mean_history <= 0:
            raise ConfigError(f"mean_history={self.mean_history}: must be positive")
        if self.search_sharpness < 0:  # the engine would show the pairs' least alike items first
            raise ConfigError(f"search_sharpness={self.search_sharpness}: must not be negative "
                              "(0 is a visual search that ranks at random)")
        for name in ("style_spread", "taste_spread", "session_noise", "click.item_effect_std",
                     "click.collaborative_std", "click.noise_std"):
            if floats[name] < 0:
                raise ConfigError(f"{name}={floats[name]}: a spread, must not be negative")
        try:
            start = date.fromisoformat(self.t0)  # a date: a time or a UTC offset would be dropped unseen
        except (TypeError, ValueError):
            raise ConfigError(f"t0={self.t0!r}: not an ISO date (YYYY-MM-DD)") from None
        # The generator packs (user, time) into one int64 search key, 32 bits of Unix seconds.
        first_day = (start - date(1970, 1, 1)).days - self.days_before
        if first_day < 0 or (first_day + self.days_before + self.days) * 86_400 >= 2 ** 32:
            raise ConfigError(f"t0={self.t0}, days_before={self.days_before}, days={self.days}: the timeline "
                              "must lie within 1970-01-01 and 2106-02-07 (Unix seconds below 2^32)")


def tiny(config: SynthConfig) -> SynthConfig:
    """A world small enough for unit tests (a few seconds), same generative model."""
    return replace(config, items=600, users=200, categories=6, brands=20, events=6_000,
                   pairs_train=600, pairs_test=150, mean_history=20.0, max_history=60,
                   cf_groups=4)
