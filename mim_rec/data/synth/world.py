"""The generative model of the embedded world: latent factors, behaviour histories, search
sessions with a click model, and visual-search purchase pairs.

Latent factors (``S = style_dim``, all seeded):

* category centroids ``mu_c`` (unit vectors); item style ``s_j = unit(mu_{c_j} + a z_j)``,
  rendered into the item's image and named (imperfectly) in its title;
* item ID effect ``b_j`` (quality/popularity, invisible in content) and a latent item group
  ``h_j``; user group ``g_u`` and a group affinity matrix ``A`` (collaborative effect, also
  invisible in content);
* user taste ``v_u``; the user's preferred style in category ``c`` is ``p_uc = unit(mu_c + a v_u)``;
  a few favourite categories with Dirichlet weights.

Behaviour histories: each user draws ``L_u`` (log-normal) items without replacement, mostly
from favourite categories, with probability ``softmax(content * cos(p_uc, s_j) + b_j + A[g_u, h_j])``,
at times after each item's creation. Search sessions: a user searches a favourite category
``c`` for a wanted style ``w = unit(p_uc + n)``; the page shows items created before the
session (mostly of category ``c``, popular ones more often, some exploration), ordered by a
noisy relevance. Each impression is clicked with probability ``sigmoid(logit)``::

    logit = bias + content * cos(w, s_j) + category * [c_j = c] + b_j + A[g_u, h_j]
            + position * log1p(rank) + noise

Visual-search pairs (the Pailitao setting C-SFT learns from): a session's user photographs
the wanted style ``w`` (the query image is a fresh rendering of it); the engine shows the items
of category ``c`` that look most like it (``search_sharpness * cos(w, s_j)`` plus Gumbel noise:
an imperfect visual matcher); the user picks one by the same taste that drives clicks
(``content * cos(w, s_j) + b_j + A[g_u, h_j]`` plus Gumbel noise), and buys it with probability
``sigmoid(4 cos(w, s_j) - 2)`` (``purchase``, else ``click``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Dict, List, Tuple

import numpy as np

from mim_rec.config import ConfigError
from mim_rec.data.synth.config import SynthConfig

DAY = 86_400


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _gumbel(rng: np.random.Generator, shape) -> np.ndarray:
    return -np.log(-np.log(rng.uniform(1e-12, 1.0, shape)))


@dataclass
class Latents:
    centroids: np.ndarray        # [C, S]
    item_category: np.ndarray    # [N]
    item_style: np.ndarray       # [N, S] unit
    item_effect: np.ndarray      # [N]   b_j
    item_group: np.ndarray       # [N]   h_j
    item_created: np.ndarray     # [N]   unix seconds
    item_brand: np.ndarray       # [N]
    item_price: np.ndarray       # [N]
    user_taste: np.ndarray       # [U, S]
    user_group: np.ndarray       # [U]
    user_favourites: np.ndarray  # [U, F] category ids
    user_favourite_weights: np.ndarray  # [U, F]
    affinity: np.ndarray         # [G, G]

    def preferred_style(self, users: np.ndarray, categories: np.ndarray, spread: float) -> np.ndarray:
        """``p_uc``: what user ``u`` likes within category ``c``."""
        return unit(self.centroids[categories] + spread * self.user_taste[users])

    def collaborative(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self.affinity[self.user_group[users], self.item_group[items]]


def time_line(config: SynthConfig) -> Tuple[int, int]:
    """``(t0, t_end)`` in unix seconds."""
    t0 = int(datetime.fromisoformat(config.t0).replace(tzinfo=timezone.utc).timestamp())
    return t0, t0 + config.days * DAY


def sample_latents(config: SynthConfig, rng: np.random.Generator) -> Latents:
    n, u, c, s, g = config.items, config.users, config.categories, config.style_dim, config.cf_groups
    t0, t_end = time_line(config)
    centroids = unit(rng.normal(size=(c, s)))
    item_category = rng.integers(0, c, n)
    item_style = unit(centroids[item_category] + config.style_spread * rng.normal(size=(n, s)) / np.sqrt(s) * 2)
    old = rng.random(n) < 0.5
    created = np.where(old, rng.integers(t0 - config.days_before * DAY, t0, n), rng.integers(t0, t_end, n))
    favourites = np.stack([rng.choice(c, size=min(3, c), replace=False) for _ in range(u)])
    return Latents(
        centroids=centroids,
        item_category=item_category,
        item_style=item_style,
        item_effect=rng.normal(0, config.click.item_effect_std, n),
        item_group=rng.integers(0, g, n),
        item_created=created.astype(np.int64),
        item_brand=rng.integers(0, config.brands, n),
        item_price=np.round(np.exp(rng.normal(3.5, 0.8, n)), 2).astype(np.float32),
        user_taste=rng.normal(size=(u, s)) / np.sqrt(s) * 2,
        user_group=rng.integers(0, g, u),
        user_favourites=favourites,
        user_favourite_weights=rng.dirichlet(np.ones(favourites.shape[1]), u),
        affinity=rng.normal(0, config.click.collaborative_std, (g, g)),
    )


@dataclass
class Histories:
    """All users' behaviours, flat and sorted by (user, time); ``start[u]:start[u]+length[u]``."""

    items: np.ndarray
    categories: np.ndarray
    ts: np.ndarray
    start: np.ndarray
    length: np.ndarray
    cut: int  # users whose drawn length exceeded their candidate pool, so drew the whole pool


def sample_histories(config: SynthConfig, lat: Latents, rng: np.random.Generator) -> Histories:
    _, t_end = time_line(config)
    t0 = t_end - config.days * DAY
    by_category = [np.flatnonzero(lat.item_category == c) for c in range(config.categories)]
    lengths = np.clip(np.round(rng.lognormal(np.log(config.mean_history) - 0.32, 0.8, config.users)),
                      3, config.max_history).astype(np.int64)
    items, times, cut = [], [], 0
    for user in range(config.users):
        favs, weights = lat.user_favourites[user], lat.user_favourite_weights[user]
        pool = np.concatenate([by_category[c] for c in favs] + [rng.integers(0, config.items, 100)])
        pool = np.unique(pool)
        cats = lat.item_category[pool]
        prior = np.full(len(pool), np.log(0.1 / config.categories))
        for c, w in zip(favs, weights):
            prior[cats == c] = np.log(0.9 * w / max(len(by_category[c]), 1) + 1e-12)
        taste = lat.preferred_style(np.full(len(pool), user), cats, config.taste_spread)
        score = (config.click.content * np.einsum("ij,ij->i", taste, lat.item_style[pool])
                 + lat.item_effect[pool] + lat.collaborative(np.full(len(pool), user), pool)
                 + prior + _gumbel(rng, len(pool)))
        take = min(int(lengths[user]), len(pool))
        cut += int(take < lengths[user])
        chosen = pool[np.argpartition(-score, take - 1)[:take]]
        lengths[user] = take
        earliest = np.maximum(lat.item_created[chosen], t0)
        items.append(chosen)
        times.append(earliest + (rng.random(take) * (t_end - earliest)).astype(np.int64))
    users = np.repeat(np.arange(config.users), lengths)
    flat_items, flat_ts = np.concatenate(items), np.concatenate(times)
    order = np.lexsort((flat_ts, users))
    start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return Histories(flat_items[order], lat.item_category[flat_items[order]], flat_ts[order], start, lengths, cut)


@dataclass
class Sessions:
    """One row per impression, ordered by time."""

    user: np.ndarray
    ts: np.ndarray
    item: np.ndarray
    position: np.ndarray
    label: np.ndarray
    session: np.ndarray
    query_category: np.ndarray
    wanted: np.ndarray           # [sessions, S]: the style searched for in each session
    components: Dict[str, np.ndarray]


def sample_sessions(config: SynthConfig, lat: Latents, hist: Histories,
                    rng: np.random.Generator) -> Sessions:
    _, t_end = time_line(config)
    n_sessions, page = config.events // config.page_size, config.page_size
    activity = np.sqrt(hist.length) / np.sqrt(hist.length).sum()
    users = rng.choice(config.users, size=n_sessions, p=activity)
    ts = np.sort(rng.integers(t_end - config.event_days * DAY, t_end, n_sessions))
    fav_index = (rng.random(n_sessions)[:, None] > np.cumsum(lat.user_favourite_weights[users], 1)).sum(1)
    query_category = lat.user_favourites[users, np.minimum(fav_index, lat.user_favourites.shape[1] - 1)]
    wanted = unit(lat.preferred_style(users, query_category, config.taste_spread)
                  + config.session_noise * rng.normal(size=(n_sessions, config.style_dim)) / np.sqrt(config.style_dim) * 2)

    in_category = max(1, int(round(page * 0.8)))
    shown = np.concatenate([_category_candidates(config, lat, query_category, ts, in_category, rng),
                            _any_candidates(lat, ts, page - in_category, rng)], axis=1)
    content = np.einsum("sd,spd->sp", wanted, lat.item_style[shown])
    relevance = 0.5 * config.click.content * content + 0.3 * lat.item_effect[shown] + rng.normal(0, 0.5, shown.shape)
    order = np.argsort(-relevance, axis=1)
    shown = np.take_along_axis(shown, order, 1)
    content = np.take_along_axis(content, order, 1)

    session_ids = np.repeat(np.arange(n_sessions), page)
    flat_users, item = users[session_ids], shown.ravel()
    position = np.tile(np.arange(page), n_sessions)
    cm = config.click
    components = {
        "content": cm.content * content.ravel(),
        "category": cm.category * (lat.item_category[item] == query_category[session_ids]),
        "item_effect": lat.item_effect[item],
        "collaborative": lat.collaborative(flat_users, item),
        "position": cm.position * np.log1p(position),
        "noise": rng.normal(0, cm.noise_std, len(item)),
    }
    logit = cm.bias + sum(components.values())
    components["logit"] = logit
    label = (rng.random(len(item)) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    return Sessions(flat_users, ts[session_ids], item, position.astype(np.int16), label, session_ids,
                    query_category, wanted, components)


def _dedupe_top(candidates: np.ndarray, score: np.ndarray, take: int) -> np.ndarray:
    """Per row, the ``take`` best-scoring candidates, repeats ranked last: a row with fewer than
    ``take`` distinct candidates keeps a repeat (one item shown twice on a page)."""
    order = np.argsort(candidates, axis=1)
    sorted_c = np.take_along_axis(candidates, order, 1)
    dup = np.zeros_like(sorted_c, dtype=bool)
    dup[:, 1:] = sorted_c[:, 1:] == sorted_c[:, :-1]
    score = np.take_along_axis(score, order, 1) - 1e9 * dup
    best = np.argpartition(-score, take - 1, axis=1)[:, :take]
    return np.take_along_axis(sorted_c, best, 1)


def _category_candidates(config: SynthConfig, lat: Latents, categories: np.ndarray, ts: np.ndarray,
                         take: int, rng: np.random.Generator) -> np.ndarray:
    """Items of each session's category created before it; popular ones shown more often."""
    out = np.empty((len(ts), take), dtype=np.int64)
    for c in range(config.categories):
        rows = np.flatnonzero(categories == c)
        if len(rows) == 0:
            continue
        items = np.flatnonzero(lat.item_category == c)
        items = items[np.argsort(lat.item_created[items], kind="stable")]
        available = np.searchsorted(lat.item_created[items], ts[rows], side="right")
        if (available < take).any():  # the sizes asked for cannot fill a page: a setting error
            raise ConfigError(f"page_size={config.page_size}: its {take} in-category slots need more items of "
                              f"category {c} than exist before some session (items={config.items} over "
                              f"categories={config.categories}); raise items, or lower categories or page_size")
        candidates = items[(rng.random((len(rows), 3 * take)) * available[:, None]).astype(np.int64)]
        score = 0.5 * lat.item_effect[candidates] + _gumbel(rng, candidates.shape)
        out[rows] = _dedupe_top(candidates, score, take)
    return out


def _any_candidates(lat: Latents, ts: np.ndarray, take: int, rng: np.random.Generator) -> np.ndarray:
    """Exploration slots: any item created before the session."""
    if take == 0:
        return np.empty((len(ts), 0), dtype=np.int64)
    by_time = np.argsort(lat.item_created, kind="stable")
    available = np.searchsorted(lat.item_created[by_time], ts, side="right")
    return by_time[(rng.random((len(ts), take)) * available[:, None]).astype(np.int64)]


def history_slices(hist: Histories, users: np.ndarray, ts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """For each event, ``(offsets [E+1], flat indices into hist)`` of behaviours before ``ts``."""
    key = hist.ts + (np.repeat(np.arange(len(hist.start)), hist.length) << 32)
    count = np.searchsorted(key, ts + (users.astype(np.int64) << 32), side="left") - hist.start[users]
    offsets = np.concatenate([[0], np.cumsum(count)])
    index = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - hist.start[users], count)
    return offsets, index


# Rows of one category's searches are ranked in blocks of at most this many (search, item)
# cells, so memory stays flat however many items a category holds (one category of 20,000
# items at full size took three 20,000 x 20,000 float64 arrays). The uniform draws fill the
# same cells in the same order as one whole-category draw, so a world is the same either way.
SEARCH_BLOCK_CELLS = 1 << 22


def _search(config: SynthConfig, rng: np.random.Generator, wanted: np.ndarray, styles: np.ndarray,
            available: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank one category's ``styles`` for each search's ``wanted`` style (Gumbel-perturbed
    match; items created after the search, ``>= available``, excluded) and keep the top
    ``search_results``: ``(shown positions, their match, whether each existed)``, ``[n, k]``."""
    n, k = len(wanted), config.search_results
    shown = np.empty((n, k), np.int64)
    shown_match, shown_exists = np.empty((n, k)), np.empty((n, k), bool)
    step = max(1, SEARCH_BLOCK_CELLS // max(len(styles), 1))
    for start in range(0, n, step):
        block = slice(start, start + step)
        match = wanted[block] @ styles.T                                      # [b, pool]
        relevance = config.search_sharpness * match + _gumbel(rng, match.shape)
        relevance[np.arange(len(styles))[None, :] >= available[block, None]] = -np.inf  # not yet created
        shown[block] = np.argpartition(-relevance, k - 1, axis=1)[:, :k]
        shown_match[block] = np.take_along_axis(match, shown[block], 1)
        shown_exists[block] = np.isfinite(np.take_along_axis(relevance, shown[block], 1))
    return shown, shown_match, shown_exists


def sample_pairs(config: SynthConfig, lat: Latents, sessions: Sessions, rng: np.random.Generator,
                 count: int, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """``count`` visual searches, one per distinct session among the impression ``rows``:
    returns ``(session, item, signal)`` per pair (see the module docstring)."""
    session = np.unique(sessions.session[rows])
    session = np.sort(rng.choice(session, size=min(count, len(session)), replace=False))
    first_row = np.searchsorted(sessions.session, session)
    users, ts = sessions.user[first_row], sessions.ts[first_row]
    category, wanted = sessions.query_category[session], sessions.wanted[session]
    item = np.empty(len(session), dtype=np.int64)
    for c in np.unique(category):
        rows_c = np.flatnonzero(category == c)
        pool = np.flatnonzero(lat.item_category == c)
        pool = pool[np.argsort(lat.item_created[pool], kind="stable")]
        if len(pool) < config.search_results:
            raise ConfigError(f"search_results={config.search_results}: category {c} has only {len(pool)} items; "
                              "lower search_results or raise items")
        available = np.searchsorted(lat.item_created[pool], ts[rows_c], side="right")
        shown, shown_match, shown_exists = _search(config, rng, wanted[rows_c], lat.item_style[pool], available)
        taste = (config.click.content * shown_match
                 + lat.item_effect[pool[shown]] + lat.collaborative(users[rows_c, None], pool[shown])
                 + _gumbel(rng, shown.shape))
        taste[~shown_exists] = -np.inf
        item[rows_c] = pool[np.take_along_axis(shown, taste.argmax(1)[:, None], 1)[:, 0]]
    match = np.einsum("pd,pd->p", wanted, lat.item_style[item])
    purchase = rng.random(len(item)) < 1 / (1 + np.exp(-(4 * match - 2)))
    return session, item, ["purchase" if p else "click" for p in purchase]
