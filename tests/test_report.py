"""Charts (plan --plot, report --plot, the model card's chart), report, and the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import assert_one_error_line
from test_bundle_hardening import NAME, make_bundle
from edgepack.bundle.manifest import CARD_CHART, content_digest, content_section
from edgepack.cli import cli
from edgepack.memory import format_peak, format_size

matplotlib = pytest.importorskip("matplotlib", reason="charts need matplotlib (edgepack[plot])")

from edgepack.report import CANDIDATE_GID, Chart, figure  # noqa: E402  (after the skip)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: A pack's record: two measured (one below the floor, then the chosen one), three not measured
#: (one over the budget by its estimate).
CANDIDATES = [
    {"spec": "quantize:scheme=int4", "estimated_peak_bytes": 400, "quality_cost": 0.03, "fits": True,
     "measured": {"peak_bytes": 420, "fidelity": 0.95}, "rejected_because": "mean_cosine 0.95 is below the floor 0.99"},
    {"spec": "quantize:scheme=int8", "estimated_peak_bytes": 600, "quality_cost": 0.001, "fits": True,
     "measured": {"peak_bytes": 580, "fidelity": 0.999}, "chosen": True},
    {"spec": "prune:ffn=0.25", "estimated_peak_bytes": 700, "quality_cost": 0.07, "fits": True,
     "rejected_because": "not measured: pack measures at most 2 candidates"},
    {"spec": "precision:dtype=bf16", "estimated_peak_bytes": 900, "quality_cost": 0.0002, "fits": True},
    {"spec": "(none)", "estimated_peak_bytes": 1800, "quality_cost": 0.0, "fits": False,
     "rejected_because": "estimated peak 1.8 kB exceeds the budget 1.0 kB"},
]


def _runner() -> CliRunner:
    return CliRunner()


def _candidate_points(ax) -> list[tuple[float, float]]:
    return [tuple(xy) for c in ax.collections if c.get_gid() == CANDIDATE_GID for xy in c.get_offsets()]


def _png_shape(path: Path) -> tuple[int, ...]:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return matplotlib.image.imread(path).shape


@pytest.fixture
def recorded(tmp_path) -> Path:
    """A hand-made bundle whose manifest records CANDIDATES."""
    return make_bundle(tmp_path / "dist" / NAME, mutate=lambda m: m.update(candidates=CANDIDATES))


def test_bundle_chart_has_one_marker_per_candidate(recorded):
    manifest = json.loads((recorded / "manifest.json").read_text())
    chart = Chart.from_manifest(manifest)
    (ax,) = figure([chart]).axes
    points = _candidate_points(ax)
    assert len(points) == len(CANDIDATES)
    # measured candidates sit at their measured peak and fidelity; the others on a band below
    assert (420, 0.95) in points and (580, 0.999) in points
    band = {y for x, y in points if x in (700, 900, 1800)}
    assert len(band) == 1 and band.pop() < 0.95
    lines = [l for l in ax.lines if l.get_linestyle() == "--"]
    assert any(tuple(l.get_xdata()) == (1000, 1000) for l in lines)  # the budget (bytes < 10 kB: unit B)
    assert any(tuple(l.get_ydata()) == (0.99, 0.99) for l in lines)  # the floor


def test_a_candidate_stopped_below_the_floor_is_drawn_and_printed_at_its_bound(tmp_path):
    """A candidate whose measuring stopped once it was proven below the floor (``fidelity_at_most``):
    charted at its measured peak and its bound, marked apart from the fully measured ones;
    ``report`` prints the bound."""
    stopped = {"spec": "quantize:scheme=int4,head=True", "estimated_peak_bytes": 380, "quality_cost": 0.04,
               "fits": True, "measured": {"peak_bytes": 390, "fidelity_at_most": 0.97, "inputs_run": 5},
               "rejected_because": "mean_cosine at most 0.97000 (...), below the floor 0.99"}
    bundle = make_bundle(tmp_path / "dist" / NAME, mutate=lambda m: m.update(candidates=[stopped] + CANDIDATES))
    (ax,) = figure([Chart.from_manifest(json.loads((bundle / "manifest.json").read_text()))]).axes
    marked = [c for c in ax.collections if c.get_gid() == CANDIDATE_GID and c.get_label().startswith("stopped")]
    assert len(marked) == 1 and [tuple(xy) for xy in marked[0].get_offsets()] == [(390, 0.97)]
    assert len(_candidate_points(ax)) == len(CANDIDATES) + 1
    text = _runner().invoke(cli, ["report", str(bundle)])
    assert text.exit_code == 0, text.output
    assert "<= 0.97 (5 inputs run)" in text.stdout and "3 measured" in text.stdout


def test_plan_chart_places_estimates_and_marks_the_first_plan():
    candidates = [dict(c, chosen=(c["spec"] == "quantize:scheme=int8")) for c in CANDIDATES]
    (ax,) = figure([Chart.from_plan([{k: v for k, v in c.items() if k != "measured"} for c in candidates],
                                    1000, "plan")]).axes
    points = _candidate_points(ax)
    assert sorted(points) == sorted((c["estimated_peak_bytes"], c["quality_cost"]) for c in CANDIDATES)
    assert [t.get_text() for t in ax.texts] == ["quantize:scheme=int8"]
    assert ax.yaxis_inverted()  # lower cost (better) up


def test_report_prints_each_bundle_and_plots_one_chart_per_bundle(recorded, tmp_path):
    other = make_bundle(tmp_path / "other" / NAME, mutate=lambda m: m.update(
        candidates=CANDIDATES[1:2], target={"name": "executorch", "devices": 1, "capabilities": []}))
    out = tmp_path / "report.png"
    result = _runner().invoke(cli, ["report", str(recorded), str(other), "--plot", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.splitlines()[-1])
    assert [b["target"] for b in data["bundles"]] == ["cpu", "executorch"]
    first = data["bundles"][0]
    assert first["candidates"] == {"considered": 5, "fit_estimate": 4, "measured": 2}
    assert [c["spec"] for c in first["measured"]] == ["quantize:scheme=int4", "quantize:scheme=int8"]
    assert first["measured"][0]["rejected_because"].startswith("mean_cosine 0.95")
    height, width, _ = _png_shape(out)
    assert height > width  # two charts, stacked

    text = _runner().invoke(cli, ["report", str(recorded)])
    assert text.exit_code == 0, text.output
    assert "5 considered, 4 fit by estimate, 2 measured" in text.stdout
    assert "quantize:scheme=int8" in text.stdout and "chosen" in text.stdout


def test_plot_is_refused_before_any_work_without_matplotlib(recorded, tmp_path, monkeypatch):
    import edgepack.report

    monkeypatch.setattr(edgepack.report, "plotting_available", lambda: False)
    out = tmp_path / "chart.png"
    result = _runner().invoke(cli, ["report", str(recorded), "--plot", str(out)])
    assert_one_error_line(result, 2, "--plot needs matplotlib", "pip install 'edgepack[plot]'")
    assert not out.exists()


@pytest.mark.parametrize("name, needle", [("chart.svg", "name the file *.png"), ("missing/chart.png", "does not exist")])
def test_plot_path_is_checked_first(recorded, tmp_path, name, needle):
    result = _runner().invoke(cli, ["report", str(recorded), "--plot", str(tmp_path / name)])
    assert_one_error_line(result, 2, "--plot", needle)


def test_plan_plot_draws_every_candidate(model_dir, tmp_path):
    out = tmp_path / "plan.png"
    result = _runner().invoke(cli, ["plan", str(model_dir), "--budget", "30MB", "--plot", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.splitlines()[-1])
    assert data["plot"] == str(out)
    _png_shape(out)
    (ax,) = figure([Chart.from_plan(data["candidates"], data["budget"]["bytes_per_device"], "plan")]).axes
    assert len(_candidate_points(ax)) == len(data["candidates"]) > 10


def test_model_card_states_the_manifests_figures(packed):
    bundle = Path(packed.bundle)
    manifest = packed.manifest
    card = (bundle / "README.md").read_text()
    mem, fid = manifest["memory"], manifest["fidelity"]
    for figure_text in (
        f"measured {format_peak(mem['measured_peak_bytes'])}", f"predicted {format_size(mem['predicted_peak_bytes'])}",
        f"budget {format_size(mem['budget_bytes'])}", f"{fid['metric']} {fid['value']}",
        manifest["plan"][0]["plugin"], f"torch {manifest['producer']['torch']}",
        *manifest["source"]["sha256"].values(), "edgepack verify",
    ):
        assert figure_text in card, figure_text
    weights = sum(f["size"] for f in manifest["files"]
                  if f["path"].startswith("model/") and f["path"].endswith(".safetensors"))
    assert f"the weights in `model/` hold {format_size(weights)}" in card
    # the chart: drawn, listed with its hash, and not content: content scheme /2 leaves it out,
    # and the same bundle without a chart (scheme /1, which older readers know) has the same digest
    assert f"]({CARD_CHART})" in card
    _png_shape(bundle / CARD_CHART)
    assert CARD_CHART in {f["path"] for f in manifest["files"]}
    assert manifest["content"]["scheme"] == "edgepack-content/2"
    without = {k: v for k, v in manifest.items() if k != "content"}
    without["files"] = [f for f in manifest["files"] if f["path"] != CARD_CHART]
    assert content_section(without) == {"scheme": "edgepack-content/1", "digest": manifest["content"]["digest"]}
    # under /1 a listed chart is content like any other file
    as_one = dict(manifest, content={"scheme": "edgepack-content/1", "digest": manifest["content"]["digest"]})
    assert content_digest(as_one) != manifest["content"]["digest"]
