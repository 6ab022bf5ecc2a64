"""Images that are not frontal chest X-rays, drawn in code (for the out-of-scope gate tests): a text document, a
photograph-like scene, a hand radiograph, a CT slice and a crude lateral chest view. All 8-bit grayscale."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def document(seed, size=256):
    rng = np.random.default_rng(seed)
    img = Image.new("L", (size, int(size*1.3)), 245)
    d = ImageDraw.Draw(img)
    y = 12
    while y < img.height - 12:
        x = 10
        while x < size - 20:
            w = int(rng.integers(8, 30)); d.rectangle([x, y, x + w, y + 6], fill=int(rng.integers(10, 60))); x += w + 6
        y += 14
    return np.asarray(img)

def photo(seed, size=256):
    """An outdoor scene: a bright sky gradient, a sun, buildings with lit windows, a dark street."""
    rng = np.random.default_rng(seed)
    yy = np.linspace(0, 1, size)[:, None] * np.ones((1, size))
    img = Image.fromarray((235 - 60 * yy).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([size - 70, 15, size - 30, 55], fill=255)
    x = 0
    while x < size:
        w, h = int(rng.integers(25, 60)), int(rng.integers(70, 170))
        shade = int(rng.integers(40, 120))
        d.rectangle([x, size - h, x + w, size], fill=shade)
        for wy in range(size - h + 8, size - 40, 14):
            for wx in range(x + 5, x + w - 8, 12):
                d.rectangle([wx, wy, wx + 5, wy + 7], fill=int(rng.integers(180, 250)))
        x += w + int(rng.integers(2, 10))
    d.rectangle([0, size - 35, size, size], fill=30)
    return np.asarray(img)


def hand(seed, size=256):
    rng = np.random.default_rng(seed)
    im = Image.new("L", (size, size), 15); d = ImageDraw.Draw(im)
    d.ellipse([70, 140, 190, 250], fill=170)
    for k in range(5):
        x = 60 + k * 32 + rng.integers(-4, 4); d.rounded_rectangle([x, 30 + abs(k - 2) * 12, x + 18, 170], radius=8, fill=200)
        for j in range(3): d.line([x + 2, 60 + j * 35, x + 16, 60 + j * 35], fill=120, width=2)
    return np.asarray(im)

def ct_slice(seed, size=256):
    rng = np.random.default_rng(seed)
    im = Image.new("L", (size, size), 0); d = ImageDraw.Draw(im)
    d.ellipse([20, 40, 236, 216], fill=110)
    d.ellipse([50, 70, 120, 190], fill=25); d.ellipse([136, 70, 206, 190], fill=25)
    d.ellipse([118, 150, 138, 170], fill=230)
    arr = np.asarray(im).astype(float) + rng.normal(0, 6, (size, size))
    return np.clip(arr, 0, 255).astype(np.uint8)

def lateral(seed, size=256):
    """A lateral chest view: the body fills the frame side on, the spine down the back (right) edge, one large lung
    lucency in front of it, the heart shadow low and forward (left), the arms raised across the top."""
    rng = np.random.default_rng(seed)
    im = Image.new("L", (size, size), 10)
    d = ImageDraw.Draw(im)
    d.rounded_rectangle([20, 30, 236, 256], radius=40, fill=140)          # the body, side on
    d.ellipse([60, 45, 200, 215], fill=55)                                 # one lung lucency
    d.ellipse([35, 130, 125, 235], fill=165)                               # heart shadow, anterior and low
    for k in range(8):                                                     # vertebrae along the posterior edge
        d.rectangle([196, 40 + 26 * k, 226, 60 + 26 * k], fill=215)
    d.polygon([(20, 0), (120, 0), (90, 40), (20, 60)], fill=185)           # raised arms over the top
    d.chord([40, 190, 230, 290], 180, 360, fill=175)                       # diaphragm
    arr = np.asarray(im).astype(float) + rng.normal(0, 5, (size, size))
    return np.clip(arr, 0, 255).astype(np.uint8)


KINDS = {"document": document, "photo": photo, "hand": hand, "ct": ct_slice, "lateral": lateral}
