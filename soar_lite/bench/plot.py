"""A metric against sampler steps, one line per arm: the picture of exposure bias (drawn with PIL).

Why PIL and not matplotlib: matplotlib is not a dependency, and a line plot with error bars is a
few dozen lines. The x axis is log-spaced over the step counts (8 and 40 steps are far apart in
linear terms and close in what they cost), y is the metric's range over every arm, bars are +/- one
standard deviation over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw

PALETTE = (
    (90, 90, 90),
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (140, 86, 75),
    (227, 119, 194),
)


def metric_vs_steps(
    panels: Mapping[str, Mapping[str, Mapping[int, tuple[float, float]]]],
    *,
    ylabel: str,
    size: tuple[int, int] = (420, 300),
) -> Image.Image:
    """``panels[title][arm][steps] = (mean, std)`` -> panels side by side with a shared legend."""
    arms = list(dict.fromkeys(arm for panel in panels.values() for arm in panel))
    legend_h = 18 * len(arms) + 10
    width, height = size
    image = Image.new("RGB", (width * max(len(panels), 1), height + legend_h), "white")
    draw = ImageDraw.Draw(image)
    for p, (title, panel) in enumerate(panels.items()):
        _panel(draw, p * width, width, height, title, ylabel, panel, arms)
    for i, arm in enumerate(arms):
        y = height + 5 + 18 * i
        color = PALETTE[i % len(PALETTE)]
        draw.line([(20, y + 7), (50, y + 7)], fill=color, width=3)
        draw.text((58, y), arm, fill="black")
    return image


def _panel(
    draw: ImageDraw.ImageDraw,
    x0: int,
    width: int,
    height: int,
    title: str,
    ylabel: str,
    panel: Mapping[str, Mapping[int, tuple[float, float]]],
    arms: Sequence[str],
) -> None:
    left, right, top, bottom = x0 + 55, x0 + width - 15, 28, height - 35
    steps = sorted({s for series in panel.values() for s in series})
    values = [v for series in panel.values() for m, sd in series.values() for v in (m - sd, m + sd)]
    values = [v for v in values if math.isfinite(v)]
    if not steps or not values:
        draw.text((left, top), f"{title}: no data", fill="black")
        return
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    logs = [math.log(s) for s in steps]
    span = (logs[-1] - logs[0]) or 1.0

    def xy(step: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * ((math.log(step) - logs[0]) / span if len(steps) > 1 else 0.5)
        return x, bottom - (bottom - top) * (value - lo) / (hi - lo)

    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((x0 + width // 2 - 4 * len(title), 6), title, fill="black")
    for j in range(5):
        value = lo + (hi - lo) * j / 4
        _, y = xy(steps[0], value)
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((x0 + 5, y - 6), f"{value:.2f}", fill="black")
    for step in steps:
        x, _ = xy(step, lo)
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x - 6, bottom + 6), str(step), fill="black")
    draw.text((left + (right - left) // 2 - 40, bottom + 20), "sampler steps", fill="black")
    draw.text((left + 4, top + 4), ylabel, fill=(100, 100, 100))
    for i, arm in enumerate(arms):
        series = panel.get(arm, {})
        color = PALETTE[i % len(PALETTE)]
        points = [(s, *series[s]) for s in steps if s in series and math.isfinite(series[s][0])]
        for s, m, sd in points:
            x, y_lo = xy(s, m - sd)
            _, y_hi = xy(s, m + sd)
            x += 3 * (i - (len(arms) - 1) / 2)  # a small offset so bars of different arms do not cover
            draw.line([(x, y_lo), (x, y_hi)], fill=color, width=1)
            _, y = xy(s, m)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        line = [(xy(s, m)[0] + 3 * (i - (len(arms) - 1) / 2), xy(s, m)[1]) for s, m, _ in points]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
