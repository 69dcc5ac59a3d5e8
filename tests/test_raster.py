"""The accuracy chart drawn on Pillow (insitu.report.raster): its size, where its lines fall, broken
lines at missing rounds, round tick positions, and that drawing it never loads matplotlib."""
from __future__ import annotations

import subprocess
import sys

from PIL import Image

from insitu.report.raster import LineChart, _labels, _rgb, _ticks


def _history(rounds: int, missing: int | None = None) -> list[dict]:
    out = []
    for r in range(1, rounds + 1):
        sites = {"a": {"test_accuracy": 0.5}, "b": {"test_accuracy": 0.9}}
        if r == missing:
            del sites["b"]["test_accuracy"]
        out.append({"round": r, "status": "ok", "eval_split": "test", "sites": sites, "mean_site_accuracy": 0.7, "pooled_accuracy": 0.72})
    return out


def _near(px: tuple[int, int, int], colour: tuple[int, int, int], tol: int = 40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(px, colour))


def test_ticks_are_round_and_inside_the_range():
    assert _ticks(-0.45, 31.45) == [0, 5, 10, 15, 20, 25, 30]
    assert _ticks(0.8, 5.2) == [1, 2, 3, 4, 5]
    assert _ticks(-2.0, 63.0) == [0, 10, 20, 30, 40, 50, 60]
    assert _ticks(0.5, 1.5) == [0.6, 0.8, 1.0, 1.2, 1.4]
    assert _labels([0.6, 0.8, 1.0, 1.2]) == ["0.6", "0.8", "1.0", "1.2"] and _labels([0, 5, 10]) == ["0", "5", "10"]
    assert _labels([0.25, 0.5, 0.75]) == ["0.25", "0.50", "0.75"]


def test_each_line_is_drawn_where_its_values_are(tmp_path):
    chart = LineChart(title="two\nlines", xlabel="round", ylabel="test accuracy")
    chart.line(range(1, 11), [0.5] * 4 + [float("nan")] + [0.5] * 5, "site a", width=1, alpha=0.6)  # round 5 missing
    chart.line(range(1, 11), [0.9] * 10, "mean", width=2.5, colour="black")
    chart.hline(0.3, "baseline", colour="tab:red", style=":")
    left, top, right, bottom = chart.save(tmp_path / "c.png")
    img = Image.open(tmp_path / "c.png").convert("RGB")
    assert img.size == (770, 440) and 0 < left < right < 770 and 0 < top < bottom < 440
    x_of = lambda r: round(left + (r - 0.55) / (10.45 - 0.55) * (right - left))  # noqa: E731  (5 % margins)
    y_of = lambda v: round(bottom - v * (bottom - top))  # noqa: E731

    def seen(colour, x, v, tol=40):
        return any(_near(img.getpixel((xx, yy)), colour, tol) for xx in range(x - 3, x + 4) for yy in range(y_of(v) - 2, y_of(v) + 3))

    assert seen((0, 0, 0), x_of(3), 0.9, 30)
    assert seen(_rgb("#1f77b4", 0.6), x_of(2.5), 0.5)
    assert not seen(_rgb("#1f77b4", 0.6), x_of(5), 0.5)  # the line breaks where the value is missing
    assert seen(_rgb("tab:red"), x_of(2), 0.3, 60) and seen(_rgb("tab:red"), x_of(7), 0.3, 60)
    assert all(img.getpixel((x_of(3), y_of(v))) == (255, 255, 255) for v in (0.15, 0.7))  # nothing where no value lies


def test_accuracy_plot_writes_the_chart(tmp_path):
    from insitu.report.plots import accuracy_plot

    path = tmp_path / "acc.png"
    accuracy_plot(_history(10, missing=5), path, title="heart · fedavg\nsecond line", baselines={"own model, own split": 0.3})
    assert Image.open(path).size == (770, 440) and path.stat().st_size > 5000


def test_a_run_with_every_round_aborted_still_gets_its_axes(tmp_path):
    from insitu.report.plots import accuracy_plot

    accuracy_plot([{"round": 1, "status": "aborted", "sites": {}}], tmp_path / "a.png", title="aborted")
    assert Image.open(tmp_path / "a.png").size == (770, 440)


def test_simulate_never_imports_matplotlib(tmp_path):
    code = ("import sys; from insitu.apps.simulate import simulate; "
            f"simulate(rounds=2, out={str(tmp_path / 'run')!r}, progress=False); "
            "print(sorted(m for m in ('matplotlib', 'scipy', 'pandas', 'sklearn', 'sqlalchemy', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "run" / "accuracy.png").stat().st_size > 5000
