"""Loss curves drawn as a plain PNG with Pillow.

Why not ``gr.LinePlot``: in Gradio 6 a line plot fixes its colour domain when it is first drawn
and does not redraw when a series appears later (the SOAR arm starts after the SFT arm), so live
curves went invisible in the browser. A picture drawn here shows exactly the rows it is given, and
needs no plotting library beyond Pillow, which soar-lite already depends on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

COLORS = ((37, 99, 235), (249, 115, 22), (220, 38, 38), (22, 163, 74), (147, 51, 234), (8, 145, 178))
GRID = (229, 231, 235)
INK = (55, 65, 81)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def loss_chart(
    rows: Sequence[dict[str, Any]], *, width: int = 960, height: int = 300, title: str = "loss"
) -> Image.Image:
    """Rows ``{"step", "loss", "series"}`` as one line per series, with axes and a legend."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font(13)
    left, right, top, bottom = 64, width - 16, 28, height - 40
    draw.text((left, 6), title, fill=INK, font=font)
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        series.setdefault(str(row["series"]), []).append((float(row["step"]), float(row["loss"])))
    if not series:
        draw.text((left, (top + bottom) // 2), "no steps logged yet", fill=INK, font=font)
        return image
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    pad = (max(ys) - min(ys)) * 0.05 or 0.05
    y0, y1 = min(ys) - pad, max(ys) + pad

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for y in _ticks(y0, y1):
        _, py = at(x0, y)
        draw.line([(left, py), (right, py)], fill=GRID)
        draw.text((4, py - 7), f"{y:.4g}", fill=INK, font=font)
    for x in sorted({round(x) for x in _ticks(x0, x1, 6)}):  # steps are whole numbers
        px, _ = at(x, y0)
        draw.line([(px, top), (px, bottom)], fill=GRID)
        draw.text((px - 8, bottom + 4), f"{x:.0f}", fill=INK, font=font)
    draw.rectangle([left, top, right, bottom], outline=INK)
    legend_x = left
    for i, (name, points) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        coords = [at(x, y) for x, y in sorted(points)]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        for px, py in coords if len(coords) <= 60 else []:  # dots only while they stay apart
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        draw.line([(legend_x, height - 12), (legend_x + 18, height - 12)], fill=color, width=3)
        draw.text((legend_x + 22, height - 19), name, fill=INK, font=font)
        legend_x += 34 + int(draw.textlength(name, font=font))
    draw.text((right - 30, height - 19), "step", fill=INK, font=font)
    return image
