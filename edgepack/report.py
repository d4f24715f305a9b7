"""Charts of the planner's candidates: peak memory against quality, one chart per target.

``edgepack plan --plot`` draws what the planner estimates before anything is packed (estimated
peak against the estimated quality cost); ``edgepack report --plot`` and the bundle's model card
draw what ``pack`` recorded (measured peak and fidelity of the candidates it measured, the
estimate of the others). Both read the candidates' JSON form (:meth:`Candidate.to_json`, the
manifest's ``candidates``), so a chart can be drawn from a bundle long after it was packed.

matplotlib is optional (``pip install 'edgepack[plot]'``); it is drawn on a bare Agg canvas,
without pyplot, so no display and no global figure state are involved.
"""

from __future__ import annotations

import errno
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from edgepack.bundle.manifest import CARD_CHART
from edgepack.errors import UsageError

PLOT_HINT = "install matplotlib for charts: pip install 'edgepack[plot]'"
__all__ = ["CARD_CHART", "Chart", "Point", "figure", "plotting_available", "require_plotting", "save"]
#: The gid of each chart's per-candidate markers: one marker per candidate, whatever its fate.
CANDIDATE_GID = "candidate"


def plotting_available() -> bool:
    """Whether matplotlib is installed (without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def require_plotting(path: str | Path) -> None:
    """Refuse ``--plot path`` up front, before any work: matplotlib missing, or a path the
    chart cannot be written to."""
    if not plotting_available():
        raise UsageError(f"--plot needs matplotlib, which is not installed; {PLOT_HINT}")
    _check_path(Path(path))


def _check_path(path: Path, what: str = "--plot") -> None:
    if path.suffix.lower() != ".png":
        raise UsageError(f"{what} {path}: the chart is a PNG; name the file *.png")
    if not path.parent.is_dir():
        raise UsageError(f"{what} {path}: the directory {path.parent} does not exist")


@dataclass(frozen=True)
class Point:
    """One candidate as a chart shows it."""

    spec: str
    estimated_peak: int
    quality_cost: float
    fits: bool
    chosen: bool
    measured_peak: int | None = None
    fidelity: float | None = None
    #: the bound of a candidate whose measuring stopped once it was proven below the floor
    fidelity_at_most: float | None = None

    @property
    def measured_fidelity(self) -> float | None:
        """Where the chart places it: the fidelity measured, or the bound of a stopped run."""
        return self.fidelity if self.fidelity is not None else self.fidelity_at_most

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Point | None":
        """The point of one candidate's JSON form; None when it records no estimated peak (a
        hand-written manifest), which no chart can place."""
        peak = _finite(data.get("estimated_peak_bytes"))
        if peak is None:
            return None
        measured = data.get("measured") if isinstance(data.get("measured"), dict) else {}
        measured_peak = _finite(measured.get("peak_bytes"))
        return cls(spec=str(data.get("spec") or "(unnamed)"), estimated_peak=int(peak),
                   quality_cost=_finite(data.get("quality_cost")) or 0.0, fits=bool(data.get("fits")),
                   chosen=bool(data.get("chosen")), measured_peak=None if measured_peak is None else int(measured_peak),
                   fidelity=_finite(measured.get("fidelity")), fidelity_at_most=_finite(measured.get("fidelity_at_most")))


def _finite(value: Any) -> float | None:
    """A number a chart can place, or None (missing, a bool, NaN or infinite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _points(candidates: Sequence[Any]) -> tuple[Point, ...]:
    points = (Point.from_json(c) if isinstance(c, dict) else None for c in candidates)
    return tuple(p for p in points if p is not None)


@dataclass(frozen=True)
class Chart:
    """One target's candidates: estimated only (``plan``) or as packed (a bundle)."""

    title: str
    budget_bytes: int
    points: tuple[Point, ...]
    #: the fidelity metric and floor of a packed bundle; None for a plan, which measures nothing
    metric: str | None = None
    floor: float | None = None

    @property
    def packed(self) -> bool:
        return self.metric is not None

    @classmethod
    def from_plan(cls, candidates: Sequence[dict[str, Any]], budget_bytes: int, title: str) -> "Chart":
        """The chart of ``edgepack plan``: candidates in their JSON form."""
        return cls(title, budget_bytes, _points(candidates))

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "Chart":
        """The chart of a packed bundle, from its manifest."""
        b = manifest["bundle"]
        return cls(f"{b['name']} {b['version']} for {manifest['target']['name']}",
                   int(manifest["memory"]["budget_bytes"]),
                   _points(manifest["candidates"]),
                   metric=manifest["fidelity"]["metric"], floor=manifest["fidelity"]["floor"])


def _unit(charts: Sequence[Chart]) -> tuple[float, str]:
    """The decimal unit that keeps the largest figure readable (the same as format_size)."""
    largest = max([c.budget_bytes for c in charts] + [p.estimated_peak for c in charts for p in c.points] + [1])
    for scale, name in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= 10 * scale:
            return scale, name
    return 1.0, "B"


def _draw_plan(ax: Any, chart: Chart, scale: float) -> None:
    """Estimated peak against estimated quality cost, better (lower cost) up."""
    groups = (
        ("fits the budget", "tab:blue", "o", [p for p in chart.points if p.fits and not p.chosen]),
        ("over the budget", "tab:gray", "o", [p for p in chart.points if not p.fits and not p.chosen]),
        ("measured first by pack", "tab:red", "*", [p for p in chart.points if p.chosen]),
    )
    for label, color, marker, points in groups:
        if points:
            ax.scatter([p.estimated_peak / scale for p in points], [p.quality_cost for p in points],
                       c=color, marker=marker, s=140 if marker == "*" else 28, alpha=0.85, label=label,
                       gid=CANDIDATE_GID, zorder=3 if marker == "*" else 2)
    costs = [p.quality_cost for p in chart.points if p.quality_cost > 0]
    ax.set_yscale("symlog", linthresh=min(costs, default=1e-4) / 2)
    ax.invert_yaxis()
    ax.set_ylabel("estimated quality cost (better up)")
    for p in chart.points:
        if p.chosen:
            ax.annotate(p.spec, (p.estimated_peak / scale, p.quality_cost), textcoords="offset points",
                        xytext=(8, 6), fontsize=8, color="tab:red")


def _draw_packed(ax: Any, chart: Chart, scale: float) -> None:
    """Measured peak against measured fidelity for the candidates pack measured (their estimate
    as a hollow marker beside them; one whose measuring stopped once it was proven below the
    floor at its bound, a downward triangle); the estimate alone, on a band below, for the others."""
    measured = [p for p in chart.points if p.measured_fidelity is not None]
    others = [p for p in chart.points if p.measured_fidelity is None]
    values = [p.measured_fidelity for p in measured] + ([chart.floor] if chart.floor is not None else [])
    low, high = min(values, default=0.0), max(values + [1.0])
    pad = max((high - low) * 0.12, 1e-4)
    band = low - 2 * pad  # where the candidates without a fidelity sit
    ax.set_ylim(band - pad, high + pad)

    def x_of(p: Point) -> float:
        return (p.measured_peak if p.measured_peak is not None else p.estimated_peak) / scale

    for p in measured:
        if p.measured_peak is not None:
            ax.plot([p.estimated_peak / scale, x_of(p)], [p.measured_fidelity] * 2, color="tab:gray",
                    linewidth=0.8, linestyle=":", zorder=1)
    estimates = [p for p in measured if p.measured_peak is not None]
    if estimates:
        ax.scatter([p.estimated_peak / scale for p in estimates], [p.measured_fidelity for p in estimates],
                   facecolors="none", edgecolors="tab:gray", s=28, label="estimated peak, before measuring", zorder=2)
    def passes(p: Point) -> bool:
        return chart.floor is None or p.measured_fidelity >= chart.floor

    full = [p for p in measured if p.fidelity is not None]
    groups = (
        ("measured", "tab:blue", "o", [p for p in full if not p.chosen and passes(p)]),
        ("measured, below the floor", "tab:orange", "o", [p for p in full if not p.chosen and not passes(p)]),
        ("stopped once below the floor: at most", "tab:orange", "v", [p for p in measured if p.fidelity is None]),
        ("chosen", "tab:red", "*", [p for p in full if p.chosen]),
    )
    for label, color, marker, points in groups:
        if points:
            ax.scatter([x_of(p) for p in points], [p.measured_fidelity for p in points], c=color, marker=marker,
                       s=140 if marker == "*" else 32, label=label, gid=CANDIDATE_GID, zorder=3)
    for label, alpha, points in (("not measured, fits by estimate", 0.8, [p for p in others if p.fits]),
                                 ("not measured, over the budget by estimate", 0.35, [p for p in others if not p.fits])):
        if points:
            ax.scatter([p.estimated_peak / scale for p in points], [band] * len(points), c="tab:gray", marker="x",
                       s=22, alpha=alpha, label=label, gid=CANDIDATE_GID, zorder=2)
    if others:  # the band is not a fidelity: its tick says what it is
        ax.axhspan(band - pad, band + pad / 2, color="tab:gray", alpha=0.08, linewidth=0)
        ticks = [t for t in ax.get_yticks() if low - pad / 2 <= t <= high + pad]
        ax.set_yticks(ticks + [band], labels=[f"{t:g}" for t in ticks] + ["not measured"])
    for p in measured:
        ax.annotate(p.spec, (x_of(p), p.measured_fidelity), textcoords="offset points", xytext=(6, 4), fontsize=7,
                    color="tab:red" if p.chosen else "black")
    if chart.floor is not None:
        ax.axhline(chart.floor, color="tab:orange", linestyle="--", linewidth=1, label=f"floor {chart.floor}")
    ax.set_ylabel(f"measured {chart.metric}")


def figure(charts: Sequence[Chart]) -> Any:
    """A matplotlib Figure with one chart per entry of ``charts``, stacked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not charts:
        raise ValueError("no charts to draw")
    fig = Figure(figsize=(9, 4.8 * len(charts)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    scale, unit = _unit(charts)
    for ax, chart in zip(fig.subplots(len(charts), 1, squeeze=False)[:, 0], charts):
        (_draw_packed if chart.packed else _draw_plan)(ax, chart, scale)
        ax.axvline(chart.budget_bytes / scale, color="black", linestyle="--", linewidth=1,
                   label=f"budget {chart.budget_bytes / scale:.1f} {unit}")
        ax.set_xlabel(f"{'peak' if chart.packed else 'estimated peak'} memory ({unit})")
        ax.set_title(chart.title, fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    return fig


def save(charts: Sequence[Chart], path: str | Path, what: str = "--plot") -> Path:
    """Draw ``charts`` into the PNG ``path`` (written whole: a temporary file, then renamed);
    a bad or unwritable path is a UsageError naming ``what`` (the option that gave it)."""
    path = Path(path)
    _check_path(path, what)
    fig = figure(charts)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        # no Software/date text chunks: the same charts give the same bytes
        fig.savefig(tmp, format="png", metadata={"Software": None})
        tmp.replace(path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise  # a full disk is reported as such by the caller
        raise UsageError(f"{what} {path}: cannot be written: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path
