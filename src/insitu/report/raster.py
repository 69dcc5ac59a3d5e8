"""A small line-chart renderer on Pillow: axes, ticks, grid, solid and dashed lines, a legend, a title.

Written for the run directory's ``accuracy.png``, which every ``insitu simulate`` draws: matplotlib
costs that command ~30 MB of memory and ~0.5 s of imports for one chart of a few lines.  The chart
keeps matplotlib's look (DejaVu Sans, the tab10 colours, its dash patterns and default sizes), drawn
at three times the resolution and reduced, so that lines and text are anti-aliased.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

#: matplotlib's default colour cycle (tab10), then its named colours used here
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
NAMED = {"black": "#000000", "grey": "#808080", "tab:red": "#d62728", "tab:purple": "#9467bd", "tab:green": "#2ca02c"}
#: dash patterns in units of the line width (matplotlib's lines.*_pattern, scaled by the width as it does)
DASHES: dict[str, tuple[float, ...] | None] = {"-": None, "--": (3.7, 1.6), ":": (1.0, 1.65), "-.": (6.4, 1.6, 1.0, 1.6)}
SUPERSAMPLE = 3


@lru_cache(maxsize=None)
def _font_file() -> str | None:
    """DejaVu Sans, the font matplotlib draws with, from its data folder (found without importing it)."""
    spec = importlib.util.find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return str(path)
    return None


@lru_cache(maxsize=None)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = _font_file()
    return ImageFont.truetype(path, px) if path else ImageFont.load_default(px)


def _rgb(colour: str, alpha: float = 1.0) -> tuple[int, int, int]:
    """A colour (hex or one of :data:`NAMED`) blended with ``alpha`` over the white background."""
    h = NAMED.get(colour, colour).lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return tuple(round(c * alpha + 255 * (1 - alpha)) for c in (r, g, b))  # type: ignore[return-value]


@dataclass(frozen=True)
class Series:
    """One line of the chart: y over x (NaN breaks the line), its style and its legend label."""

    x: Sequence[float]
    y: Sequence[float]
    label: str
    colour: str
    width: float = 1.5  # points
    style: str | tuple[float, ...] = "-"  # "-", "--", ":", "-.", or a dash pattern (on, off, ...) in line widths
    alpha: float = 1.0


@dataclass
class LineChart:
    """A chart of :class:`Series` and horizontal reference lines on one pair of axes."""

    width_in: float = 7.0
    height_in: float = 4.0
    dpi: int = 110
    title: str = ""
    title_pt: float = 9.0
    xlabel: str = ""
    ylabel: str = ""
    ylim: tuple[float, float] = (0.0, 1.0)
    legend_pt: float = 7.0
    series: list[Series] = field(default_factory=list)

    def line(self, x: Sequence[float], y: Sequence[float], label: str, *, colour: str | None = None, width: float = 1.5,
             style: str | tuple[float, ...] = "-", alpha: float = 1.0) -> None:
        colour = colour or TAB10[sum(1 for s in self.series if s.colour in TAB10) % len(TAB10)]
        self.series.append(Series(list(x), list(y), label, colour, width, style, alpha))

    def hline(self, y: float, label: str, *, colour: str, width: float = 1.5, style: str | tuple[float, ...] = "-") -> None:
        self.series.append(Series([], [y], label, colour, width, style))

    # -- drawing -------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> tuple[float, float, float, float]:
        """Write the chart as a PNG; returns the axes' frame (left, top, right, bottom) in its pixels."""
        s = SUPERSAMPLE
        pt = self.dpi / 72 * s  # pixels per point on the supersampled canvas
        W, H = round(self.width_in * self.dpi) * s, round(self.height_in * self.dpi) * s
        img = Image.new("RGB", (W, H), "white")
        d = ImageDraw.Draw(img)
        f_tick, f_label, f_title, f_leg = (_font(round(p * pt)) for p in (10, 10, self.title_pt, self.legend_pt))
        pad = 4 * pt

        xs = [v for se in self.series for v in se.x if math.isfinite(v)]
        x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
        if x1 == x0:
            x0, x1 = x0 - 0.5, x1 + 0.5
        margin = 0.05 * (x1 - x0)  # matplotlib's default axes margins
        x0, x1 = x0 - margin, x1 + margin
        xticks = _ticks(x0, x1)
        yticks = [self.ylim[0] + i * (self.ylim[1] - self.ylim[0]) / 5 for i in range(6)]
        ytext = [f"{v:.1f}" for v in yticks]
        xtext = _labels(xticks)

        tick_len = 3.5 * pt
        # the layout: room for the y label, the y tick labels, the x tick labels and x label, the title
        yl_h = _text_h(d, self.ylabel or "x", f_label)
        left = pad + (yl_h + pad if self.ylabel else 0) + max(_text_w(d, t, f_tick) for t in ytext) + tick_len + 3.5 * pt
        right = W - pad - _text_w(d, xtext[-1], f_tick) / 2
        title_lines = self.title.split("\n") if self.title else []
        line_h = _text_h(d, "Ag", f_title) * 1.2
        top = pad + len(title_lines) * line_h + (6 * pt if title_lines else 0) + _text_h(d, ytext[-1], f_tick) / 2
        tick_h = _text_h(d, "0123456789", f_tick)
        label_h = _text_h(d, "Ag", f_label)
        bottom = H - pad - (label_h + 4 * pt if self.xlabel else 0) - tick_h - 3.5 * pt - tick_len

        def X(v: float) -> float:
            return left + (v - x0) / (x1 - x0) * (right - left)

        def Y(v: float) -> float:
            lo, hi = self.ylim
            v = min(max(v, lo), hi)
            return bottom - (v - lo) / (hi - lo) * (bottom - top)

        grid = _rgb("#b0b0b0", 0.3)
        for v in xticks:
            d.line([(X(v), top), (X(v), bottom)], fill=grid, width=round(0.8 * pt))
        for v in yticks:
            d.line([(left, Y(v)), (right, Y(v))], fill=grid, width=round(0.8 * pt))

        for se in self.series:
            w = max(1, round(se.width * pt))
            colour = _rgb(se.colour, se.alpha)
            if not se.x:  # a horizontal reference line across the axes
                pts = [[(left, Y(se.y[0])), (right, Y(se.y[0]))]]
            else:
                pts, run = [], []
                for a, b in zip(se.x, se.y):
                    if math.isfinite(a) and math.isfinite(b):
                        run.append((X(a), Y(b)))
                    elif run:
                        pts.append(run)
                        run = []
                pts.append(run)
            pattern = DASHES[se.style] if isinstance(se.style, str) else se.style
            for run in pts:
                if len(run) == 1:
                    d.ellipse([run[0][0] - w / 2, run[0][1] - w / 2, run[0][0] + w / 2, run[0][1] + w / 2], fill=colour)
                elif run:
                    _polyline(d, run, colour, w, None if pattern is None else [p * se.width * pt for p in pattern])

        # the axes box, ticks and their labels
        spine = max(1, round(0.8 * pt))
        d.rectangle([left, top, right, bottom], outline="black", width=spine)
        for v, t in zip(xticks, xtext):
            d.line([(X(v), bottom), (X(v), bottom + tick_len)], fill="black", width=spine)
            d.text((X(v), bottom + tick_len + 3.5 * pt), t, font=f_tick, fill="black", anchor="ma")
        for v, t in zip(yticks, ytext):
            d.line([(left - tick_len, Y(v)), (left, Y(v))], fill="black", width=spine)
            d.text((left - tick_len - 3.5 * pt, Y(v)), t, font=f_tick, fill="black", anchor="rm")
        if self.xlabel:
            d.text(((left + right) / 2, bottom + tick_len + 3.5 * pt + tick_h + 4 * pt), self.xlabel, font=f_label, fill="black", anchor="ma")
        if self.ylabel:
            tw, th = _text_w(d, self.ylabel, f_label), _text_h(d, self.ylabel, f_label)
            label = Image.new("RGB", (math.ceil(tw) + 4, math.ceil(th * 1.3) + 4), "white")
            ImageDraw.Draw(label).text((2, 2), self.ylabel, font=f_label, fill="black", anchor="la")
            label = label.rotate(90, expand=True)
            img.paste(label, (round(pad), round((top + bottom) / 2 - label.height / 2)))
        for i, t in enumerate(title_lines):
            d.text(((left + right) / 2, pad + i * line_h), t, font=f_title, fill="black", anchor="ma")
        self._legend(d, f_leg, pt, left, right, top, bottom)
        img.reduce(s).save(path)
        return left / s, top / s, right / s, bottom / s

    def _legend(self, d: ImageDraw.ImageDraw, font, pt: float, left: float, right: float, top: float, bottom: float) -> None:
        """matplotlib's legend at 'lower right': a white, light-edged box of line samples and labels."""
        if not self.series:
            return
        fs = self.legend_pt * pt  # one em
        row = fs * 1.3
        sample = 2.0 * fs
        width = sample + 0.8 * fs + max(_text_w(d, se.label, font) for se in self.series) + 0.8 * fs
        height = len(self.series) * row + 0.8 * fs
        x1, y1 = right - 0.5 * fs, bottom - 0.5 * fs
        x0, y0 = x1 - width, y1 - height
        d.rounded_rectangle([x0, y0, x1, y1], radius=0.2 * fs, fill=_rgb("#ffffff"), outline=_rgb("#cccccc"), width=max(1, round(0.8 * pt)))
        for i, se in enumerate(self.series):
            cy = y0 + 0.4 * fs + (i + 0.5) * row
            w = max(1, round(se.width * pt))
            pattern = DASHES[se.style] if isinstance(se.style, str) else se.style
            _polyline(d, [(x0 + 0.4 * fs, cy), (x0 + 0.4 * fs + sample, cy)], _rgb(se.colour, se.alpha), w,
                      None if pattern is None else [p * se.width * pt for p in pattern])
            d.text((x0 + 0.4 * fs + sample + 0.8 * fs, cy), se.label, font=font, fill="black", anchor="lm")


def _polyline(d: ImageDraw.ImageDraw, pts: list[tuple[float, float]], colour, width: int, dashes: list[float] | None) -> None:
    """A solid polyline with round joins, or dashes laid along its length (the pattern runs on across vertices)."""
    if dashes is None:
        d.line(pts, fill=colour, width=width, joint="curve")
        return
    k, left_in_dash, on = 0, dashes[0], True
    piece: list[tuple[float, float]] = [pts[0]]
    for (ax, ay), (bx, by) in zip(pts, pts[1:]):
        seg = math.hypot(bx - ax, by - ay)
        pos = 0.0
        while seg - pos > left_in_dash:
            pos += left_in_dash
            p = (ax + (bx - ax) * pos / seg, ay + (by - ay) * pos / seg)
            if on:
                piece.append(p)
                d.line(piece, fill=colour, width=width, joint="curve")
            piece = [p]
            on = not on
            k = (k + 1) % len(dashes)
            left_in_dash = dashes[k]
        left_in_dash -= seg - pos
        if on:
            piece.append((bx, by))
        else:
            piece = [(bx, by)]
    if on and len(piece) > 1:
        d.line(piece, fill=colour, width=width, joint="curve")


def _ticks(lo: float, hi: float, most: int = 7) -> list[float]:
    """Round tick positions inside [lo, hi]: the smallest step of 1, 2, 2.5 or 5 × 10ᵏ giving at most ``most`` intervals."""
    span = hi - lo
    k = math.floor(math.log10(span / most))
    step = next(m * 10 ** e for e in (k, k + 1, k + 2) for m in (1, 2, 2.5, 5) if span / (m * 10 ** e) <= most)
    first = math.ceil(lo / step - 1e-9) * step
    n = int(math.floor((hi - first) / step + 1e-9))
    return [round(first + i * step, 10) for i in range(n + 1)]


def _labels(ticks: list[float]) -> list[str]:
    """Tick labels with one number of decimals for the whole axis (0.8, 1.0, 1.2), none for whole numbers."""
    decimals = 0
    while decimals < 6 and any(abs(v * 10**decimals - round(v * 10**decimals)) > 1e-6 for v in ticks):
        decimals += 1
    return [f"{v:.{decimals}f}" for v in ticks]


def _text_w(d: ImageDraw.ImageDraw, text: str, font) -> float:
    if not text:
        return 0.0
    l, _, r, _ = d.textbbox((0, 0), text, font=font)
    return float(r - l)


def _text_h(d: ImageDraw.ImageDraw, text: str, font) -> float:
    if not text:
        return 0.0
    _, t, _, b = d.textbbox((0, 0), text, font=font, anchor="la")
    return float(b)
