"""Render a style vector into a small RGB product photo, vectorised over a batch.

The style decides what a viewer can see: the colour (hue from two style coordinates,
brightness from a third), the size, the stripe frequency and angle, the stripe colour and the
background; the category decides the silhouette. Each rendering draws its own *pose*
(position, scale, stripe phase), lighting and sensor noise, so two renderings of one style
differ in pixels but not in what they show -- which is what a visual-search query is.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "diamond", "ring")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; inputs in [0, 1], any equal shapes; output [..., 3]."""
    i = np.floor(h * 6.0) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    out = np.zeros(h.shape + (3,), dtype=np.float32)
    for k, rgb in enumerate(choices):
        out = np.where((i == k)[..., None], rgb, out)
    return out


def style_hue(styles: np.ndarray) -> np.ndarray:
    """The hue (0..1) a style is painted in; titles name the same hue (see ``text``)."""
    return (np.arctan2(styles[:, 1], styles[:, 0]) / (2 * np.pi)) % 1.0


def render(styles: np.ndarray, categories: np.ndarray, rng: np.random.Generator,
           size: int = 64, pose_jitter: float = 1.0) -> np.ndarray:
    """Images ``[n, size, size, 3] uint8`` for ``styles [n, d]`` (d >= 8) and ``categories [n]``.

    ``pose_jitter`` scales the per-rendering variation (position, scale, lighting, noise,
    a small hue shift); queries use more than catalogue photos.
    """
    n = len(styles)
    s = styles.astype(np.float32)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    ys, xs = np.meshgrid(coords, coords, indexing="ij")

    def per_item(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32)[:, None, None]

    hue = (style_hue(s) + pose_jitter * rng.normal(0, 0.01, n)) % 1.0
    value = 0.55 + 0.4 * _sigmoid(3 * s[:, 2])
    radius = (0.45 + 0.25 * np.tanh(2 * s[:, 3])) * (1 + pose_jitter * rng.uniform(-0.08, 0.08, n))
    freq = 1.5 + 5.0 * _sigmoid(3 * s[:, 4])
    angle = np.pi * _sigmoid(3 * s[:, 5]) + pose_jitter * rng.normal(0, 0.1, n)
    stripe_hue = (hue + 0.5 * np.tanh(2 * s[:, 6]) + 0.5) % 1.0
    background = 0.5 + 0.4 * np.tanh(2 * s[:, 7]) + pose_jitter * rng.normal(0, 0.03, n)
    cx = pose_jitter * rng.uniform(-0.15, 0.15, n)
    cy = pose_jitter * rng.uniform(-0.15, 0.15, n)
    phase = rng.uniform(0, 2 * np.pi, n)

    dx, dy = xs[None] - per_item(cx), ys[None] - per_item(cy)
    r = per_item(radius)
    dist = np.sqrt(dx ** 2 + dy ** 2)
    masks = {
        "circle": dist < r,
        "square": np.maximum(np.abs(dx), np.abs(dy)) < 0.85 * r,
        "triangle": (dy < 0.6 * r) & (np.abs(dx) < (dy + r) * 0.65),
        "diamond": np.abs(dx) + np.abs(dy) < 1.1 * r,
        "ring": (dist < r) & (dist > 0.55 * r),
    }
    shape_of = np.asarray(categories) % len(SHAPES)
    inside = np.zeros((n, size, size), dtype=bool)
    for k, name in enumerate(SHAPES):
        inside |= masks[name] & (shape_of == k)[:, None, None]

    wave = np.sin(per_item(freq) * np.pi * (dx * per_item(np.cos(angle)) + dy * per_item(np.sin(angle)))
                  + per_item(phase))
    primary = hsv_to_rgb(*(np.broadcast_to(per_item(a), (n, 1, 1)) for a in (hue, np.full(n, 0.8), value)))
    secondary = hsv_to_rgb(*(np.broadcast_to(per_item(a), (n, 1, 1)) for a in (stripe_hue, np.full(n, 0.6), value * 0.8)))
    paint = np.where((wave > 0.3)[..., None], secondary, primary)
    backdrop = np.broadcast_to(per_item(np.clip(background, 0, 1))[..., None], paint.shape)
    image = np.where(inside[..., None], paint, backdrop)
    image = image * per_item(1 + pose_jitter * rng.normal(0, 0.05, n))[..., None]
    image = image + 0.03 * max(pose_jitter, 0.5) * rng.standard_normal(image.shape, dtype=np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def encode_png(images: np.ndarray) -> list:
    """PNG bytes of each ``[H, W, 3] uint8`` image (deterministic: same pixels, same bytes)."""
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", optimize=False, compress_level=6)
        out.append(buffer.getvalue())
    return out
