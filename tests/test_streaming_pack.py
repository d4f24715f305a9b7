"""Packing big models on a small machine (issue 12): what pack holds while it works, what it
refuses before it starts (--work-memory), and sharded weights that verify and load with stock
transformers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from edgepack.errors import NoPlanFits, UsageError
from edgepack.testing import build_decoder, run_with_peaks

MB = 10**6


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A decoder whose fp32 weights (about 590 MB) dwarf the sampler's noise, the libraries a
    pack imports and the temporaries of quantizing the embedding table (about 160 MB here)."""
    return build_decoder("llama", tmp_path_factory.mktemp("big") / "model", hidden_size=768, num_hidden_layers=16,
                         intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4)


SHARD = 100 * MB


@pytest.fixture(scope="module")
def packed(big, tmp_path_factory):
    """int8 of ``big`` packed by the command line with 100 MB shards (four short smoke inputs:
    the memory is the point here), its memory sampled."""
    out = tmp_path_factory.mktemp("out")
    samples = out.parent / "samples.txt"
    samples.write_text("An edge device has little memory.\nPack it small.\nThe budget holds.\nShards stream.\n")
    run = run_with_peaks([sys.executable, "-m", "edgepack.cli", "pack", str(big), "--target", "cpu", "--out", str(out),
                          "--apply", "quantize:scheme=int8", "--min-fidelity", "0", "--shard-size", str(SHARD),
                          "--samples", str(samples), "--seq-len", "32", "--json"])
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return run, result, Path(result["bundle"])


def _weights(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def test_pack_never_holds_a_copy_of_the_fp32_model(big, packed):
    run, result, bundle = packed
    source = _weights(big)
    manifest = json.loads((bundle / "manifest.json").read_text())
    cost = manifest["candidates"][0]["pack_cost"]
    # what the pack owns beyond its own runtime: the int8 model and one shard being written,
    # never the whole fp32 model again (the source is memory-mapped: page cache, not its own)
    own = run.peaks["anon"] - cost["base_bytes"]
    assert own < 0.8 * source, (own, source, run.peaks)
    # the planner's cost of packing is an upper bound of what the pack held
    assert run.peaks["anon"] <= cost["apply_bytes"] * 1.05, (run.peaks, cost)
    # per-phase timings: golden outputs, then apply, save and measure of the candidate, then write
    phases = [p["phase"] for p in result["phases"]]
    assert phases == ["golden outputs", "apply", "save", "measure", "write"], phases
    assert all(p["seconds"] >= 0 for p in result["phases"])
    assert sum(p["seconds"] for p in result["phases"]) <= run.seconds


def test_weights_are_written_as_shards_with_an_index(packed):
    _, _, bundle = packed
    manifest = json.loads((bundle / "manifest.json").read_text())
    shards = sorted((bundle / "model").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2, shards
    assert all(p.stat().st_size <= SHARD + MB for p in shards)  # the bound, and a header's slack
    index = json.loads((bundle / "model" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    listed = {f["path"] for f in manifest["files"]}
    assert {f"model/{p.name}" for p in shards} | {"model/model.safetensors.index.json"} <= listed
    assert manifest["model"]["max_shard_bytes"] == SHARD


def test_a_sharded_bundle_verifies_and_loads_with_stock_transformers(packed):
    import torch
    import transformers

    import edgepack
    from edgepack.bundle.verify import verify

    _, _, bundle = packed
    report = verify(bundle)
    assert report.ok, report.failures
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    stock = transformers.AutoModelForCausalLM.from_pretrained(bundle / "model", local_files_only=True).eval()
    ours = edgepack.load(bundle)
    with torch.inference_mode():
        a, b = stock(ids).logits, ours(ids).logits
    # torchao's int8 kernel and edgepack's differ in rounding, which 16 random layers amplify;
    # a shard loaded wrong would give unrelated logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_work_memory_refuses_a_plan_before_any_work_with_the_figure(big, tmp_path):
    from edgepack.pipeline import pack

    with pytest.raises(NoPlanFits, match=r"--work-memory 100\.0 MB: the cheapest to pack, quantize:scheme=int4, "
                                         r"needs about [\d.]+ [MG]B \(golden outputs, applying and writing"):
        pack(big, target="cpu", out=tmp_path, apply=["quantize:scheme=int4"], work_memory="100MB")
    assert not any(tmp_path.iterdir())  # nothing written


def test_work_memory_keeps_the_candidates_whose_packing_fits(big):
    """int8 and int4 (GPTQ's statistics, torchao's import) cost different amounts to pack: a
    cap between the two keeps the cheaper and refuses the other with the reason."""
    from edgepack.host import load_registry
    from edgepack.model import ModelSource
    from edgepack.planner import DEFAULT_SHARD_SIZE, build_candidate, fixed_plan, negotiate, packable

    registry = load_registry()
    facts = ModelSource.open(big).facts
    target = registry.target("cpu")
    probe = target.planning_probe()
    budget = negotiate(None, target, probe)
    from edgepack.interfaces import Workload

    workload = Workload(1, 128, 136)
    int8, int4 = (build_candidate(fixed_plan(registry, [spec], probe), facts, workload, probe, budget)
                  for spec in ("quantize:scheme=int8", "quantize:scheme=int4"))
    packable([int8, int4], facts, workload, probe, work_memory=None, max_shard_bytes=DEFAULT_SHARD_SIZE)
    cheaper, costlier = sorted([int8, int4], key=lambda c: c.pack_cost.peak_bytes)
    assert costlier.pack_cost.peak_bytes > cheaper.pack_cost.peak_bytes
    cap = (cheaper.pack_cost.peak_bytes + costlier.pack_cost.peak_bytes) // 2
    kept = packable([int8, int4], facts, workload, probe, work_memory=cap, max_shard_bytes=DEFAULT_SHARD_SIZE)
    assert kept == [cheaper] and cheaper.rejected_because is None
    assert "more than --work-memory" in costlier.rejected_because


def test_precision_before_quantize_costs_its_16_bit_copy_of_all_but_the_linear_weights(big):
    """precision leaves the Linear weights to quantize (cast one at a time as it quantizes
    them): packing precision bf16 + int8 is estimated to cost int8's packing and a 16-bit copy
    of the other weights at most, not one of the whole model."""
    from edgepack.host import load_registry
    from edgepack.interfaces import Workload
    from edgepack.model import ModelSource
    from edgepack.planner import DEFAULT_SHARD_SIZE, build_candidate, fixed_plan, negotiate, packable

    registry = load_registry()
    facts = ModelSource.open(big).facts
    probe = registry.target("cpu").planning_probe()
    budget = negotiate(None, registry.target("cpu"), probe)
    workload = Workload(1, 128, 136)
    int8, both = (build_candidate(fixed_plan(registry, spec, probe), facts, workload, probe, budget)
                  for spec in (["quantize:scheme=int8"], ["precision:dtype=bf16", "quantize:scheme=int8"]))
    packable([int8, both], facts, workload, probe, work_memory=None, max_shard_bytes=DEFAULT_SHARD_SIZE)
    others_bf16 = 2 * (facts.num_parameters - facts.parameters_by_kind["linear"])
    assert others_bf16 < 2 * facts.parameters_by_kind["linear"]  # the test tells the two apart
    assert both.pack_cost.apply_bytes <= int8.pack_cost.apply_bytes + others_bf16


def test_plan_shows_what_packing_needs_and_marks_what_work_memory_refuses(big):
    """plan decides --work-memory as pack does, before any weight is loaded."""
    from click.testing import CliRunner

    from edgepack.cli import cli

    def planned(*extra):
        result = CliRunner().invoke(cli, ["plan", str(big), "--json", *extra])
        assert result.exit_code == 0, result.output
        return {c["spec"]: c for c in json.loads(result.stdout.splitlines()[-1])["candidates"]}

    free = planned()
    cheaper, costlier = sorted(["quantize:scheme=int8", "quantize:group_size=32,scheme=int4"],
                               key=lambda spec: free[spec]["pack_cost"]["peak_bytes"])
    assert free[costlier]["pack_cost"]["peak_bytes"] > free[cheaper]["pack_cost"]["peak_bytes"] > 0
    cap = (free[cheaper]["pack_cost"]["peak_bytes"] + free[costlier]["pack_cost"]["peak_bytes"]) // 2
    capped = planned("--work-memory", str(cap))
    assert "more than --work-memory" in capped[costlier]["rejected_because"]
    assert "rejected_because" not in capped[cheaper]
    chosen = [spec for spec, c in capped.items() if c["chosen"]]
    assert len(chosen) == 1 and capped[chosen[0]]["pack_cost"]["peak_bytes"] <= cap
    text = CliRunner().invoke(cli, ["plan", str(big), "--work-memory", str(cap)]).stdout
    assert "packing needs" in text and "no: --work-memory" in text


@pytest.mark.parametrize("flag, value", [("--work-memory", "lots"), ("--shard-size", "10kB")])
def test_bad_sizes_are_refused_by_name(big, tmp_path, flag, value):
    from edgepack.pipeline import PackRequest

    key = flag[2:].replace("-", "_")
    with pytest.raises(UsageError, match=flag):
        PackRequest(out=tmp_path, **{key: value}).check()


def test_only_plugins_that_write_one_whole_file_are_counted_whole():
    """pack's memory estimate counts one shard for weights saved in shards (stock saving, and
    quantize's and head pruning's own formats through save_safetensors(sharded=True)) and the
    whole file for sparsify (it compresses every Linear before it writes) and for a third-party
    plugin that overrides save and does not say otherwise."""
    from edgepack.interfaces import Compressor
    from edgepack.plugins.precision import Precision
    from edgepack.plugins.prune import Prune
    from edgepack.plugins.quantize import Quantize
    from edgepack.plugins.sparsify import Sparsify

    quantize = Quantize()
    assert not any(quantize.writes_own_file({"scheme": s}) for s in ("int8", "int8-dynamic", "int4", "mixed"))
    assert not Prune().writes_own_file({"heads": 0.25}) and Sparsify().writes_own_file({})
    assert not Precision().writes_own_file({"dtype": "bf16"})

    class OwnFormat(Precision):
        def save(self, model, model_dir, options):
            return True

    assert OwnFormat().writes_own_file({}) and type(OwnFormat()).writes_own_file is Compressor.writes_own_file


def _own_format(tmp_path: Path, limit: int | None) -> tuple[Path, dict]:
    import torch

    from edgepack.model import save_safetensors, shard_limit

    gen = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.values": torch.randn(100, 500, generator=gen).half() for i in range(5)}
    tensors["norm.weight"] = torch.randn(1000, generator=gen)
    path = tmp_path / "model.mine.safetensors"
    with shard_limit(limit):
        save_safetensors(tensors, path, metadata={"format": "mine/1", "modules": "[]"}, sharded=True)
    return path, tensors


def test_a_plugins_own_file_is_written_in_shards_and_read_back_whole(tmp_path):
    import torch

    from edgepack.model import load_safetensors, read_format_metadata, shard_files, stored_layout

    path, tensors = _own_format(tmp_path, 250_000)  # 100 kB per tensor: two to a shard
    assert not path.exists()
    shards = sorted(tmp_path.glob("model.mine-*-of-*.safetensors"))
    assert [p.name for p in shards] == [f"model.mine-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all(p.stat().st_size <= 250_000 + 4096 for p in shards)  # the bound, and a header's slack
    index = json.loads((tmp_path / "model.mine.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 100_000 + 4000
    assert shard_files(path) == shards
    loaded = load_safetensors(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert read_format_metadata(path, "mine/1")["modules"] == "[]"  # every shard carries it
    assert set(stored_layout(path)) == set(tensors)
    # sparsify's private reads (runtime=dense) find each tensor in its shard
    from edgepack.plugins.sparsify import _read_tensors

    read = _read_tensors(path, ["layer.4.values", "layer.0.values", "norm.weight"])
    assert all(torch.equal(read[k], tensors[k]) for k in read) and len(read) == 3
    # under the limit, or outside pack (no limit set): one file, as before
    for limit in (10**9, None):
        (tmp_path / str(limit)).mkdir()
        whole, _ = _own_format(tmp_path / str(limit), limit)
        assert whole.is_file() and shard_files(whole) == [whole]


@pytest.mark.parametrize("tamper, message", [
    (lambda d, index: index["weight_map"].update({"layer.0.values": "../model.mine-00001-of-00003.safetensors"}),
     "not a shard model.mine-NNNNN-of-NNNNN.safetensors beside it"),
    (lambda d, index: index["weight_map"].update({"layer.0.values": "other-00001-of-00003.safetensors"}),
     "not a shard"),
    (lambda d, index: (d / "model.mine-00002-of-00003.safetensors").unlink(), "which is not a file"),
    (lambda d, index: index["weight_map"].update({"layer.0.values": "model.mine-00003-of-00003.safetensors"}),
     "which its index does not place there"),
    (lambda d, index: index.update({"weight_map": []}), "has no weight_map"),
    (lambda d, index: (d / "model.mine.safetensors").write_bytes(b""), "holds both"),
    (lambda d, index: index["weight_map"].update({"extra.weight": "model.mine-00001-of-00003.safetensors"}),
     "lacks 'extra.weight'"),
    (lambda d, index: index["weight_map"].update({"norm.weight": "model.mine-00004-of-00004.safetensors"})
     or (d / "model.mine-00004-of-00004.safetensors").write_bytes(b"x"), "not 1 to 4 of 4"),
    (lambda d, index: (d / "model.mine-00002-of-00003.safetensors").rename(d / "elsewhere.safetensors")
     or (d / "model.mine-00002-of-00003.safetensors").symlink_to(d / "elsewhere.safetensors"), "which is not a file"),
])
def test_a_tampered_shard_index_is_refused_by_name(tmp_path, tamper, message):
    """The index comes from a bundle: it may name only shards of its own file beside it, each
    holding exactly the tensors it places there."""
    from edgepack.model import load_safetensors

    path, _ = _own_format(tmp_path, 250_000)
    index_file = tmp_path / "model.mine.safetensors.index.json"
    index = json.loads(index_file.read_text())
    tamper(tmp_path, index)
    index_file.write_text(json.dumps(index))
    with pytest.raises(UsageError, match=message):
        load_safetensors(path)


@pytest.mark.parametrize("spec", ["quantize:scheme=int4,method=rtn",
                                  pytest.param("sparsify:sparsity=0.5", marks=pytest.mark.extended)])
def test_a_bundle_in_a_plugins_own_format_is_sharded_and_verifies(tmp_path, spec):
    """int4 (and sparsify's bitmasks) at the smallest --shard-size: the plugin's file is written
    as shards with an index, listed and hashed in the manifest, and the bundle verifies (loaded
    through the plugin's restore, its smoke outputs matched)."""
    from edgepack.bundle.verify import verify
    from edgepack.pipeline import pack

    model = build_decoder("llama", tmp_path / "model", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                          num_attention_heads=4, num_key_value_heads=2)
    result = pack(model, target="cpu", out=tmp_path / "out", apply=[spec], min_fidelity=0.0, shard_size="1MB",
                  seq_len=16, progress=lambda message: None)
    name = "model.int4" if spec.startswith("quantize") else "model.sparse"
    shards = sorted((result.bundle / "model").glob(f"{name}-*-of-*.safetensors"))
    assert len(shards) >= 2 and not (result.bundle / "model" / f"{name}.safetensors").exists()
    from edgepack.model import safetensors_header

    for shard in shards:  # at most the bound, or one tensor larger than it alone
        tensors = [k for k in safetensors_header(shard) if k != "__metadata__"]
        assert shard.stat().st_size <= MB + 64 * 1024 or len(tensors) == 1, (shard, tensors)
    listed = {f["path"] for f in result.manifest["files"]}
    assert {f"model/{p.name}" for p in shards} | {f"model/{name}.safetensors.index.json"} <= listed
    report = verify(result.bundle)
    assert report.ok, report.failures


@pytest.mark.slow
def test_golden_outputs_run_the_bundles_trimmed_batches_with_the_outputs_of_padded_ones(tmp_path, monkeypatch):
    """The golden outputs run the very batches the bundle's smoke run does: the first as the
    bundle's is measured (the declared batch and length), then the other samples trimmed of
    their padding, several at a time (a decoder's generation steps then read the weights a few
    times, not once per sample). Masked padding does not change a row's outputs here, so they
    are those of one padded sample at a time, to rounding, with the same greedy tokens."""
    import torch

    import edgepack.smoke as smoke
    from edgepack.pipeline import open_source

    shapes = []
    real_batches = smoke.smoke_batches

    def recording(*args, **kwargs):
        for batch in real_batches(*args, **kwargs):
            shapes.append(tuple(batch["input_ids"].shape))
            yield batch

    monkeypatch.setattr(smoke, "smoke_batches", recording)
    session = open_source(build_decoder("llama", tmp_path / "llama"), seq_len=64, progress=lambda m: None)
    golden = session.expected
    assert shapes[0] == (1, 64)  # the declared batch and length first
    assert sum(rows for rows, _ in shapes) == 16 and len(shapes) < 16  # then the 15 others, several at a time
    assert all(rows * (span + smoke.DEFAULT_NEW_TOKENS) <= 64 + smoke.DEFAULT_NEW_TOKENS for rows, span in shapes)
    trimmed = list(shapes)
    shapes.clear()
    bundle_side = smoke.run_outputs(session.original, session.inputs, "text-generation", 1, batching=smoke.BATCHING_TRIMMED)
    assert shapes == trimmed and torch.equal(bundle_side["logits"], golden["logits"])  # the same computation
    shapes.clear()
    one_by_one = smoke.run_outputs(session.original, session.inputs, "text-generation", 1)
    assert shapes == [(1, 64)] * 16  # every sample padded, as bundles packed before smoke.batching ran
    assert torch.equal(golden["tokens"], one_by_one["tokens"])
    assert torch.allclose(golden["logits"], one_by_one["logits"], rtol=0, atol=1e-4 * one_by_one["logits"].abs().max())


@pytest.mark.parametrize("task", ["text-generation", "feature-extraction"])
def test_a_candidates_run_stops_only_once_the_floor_is_out_of_reach(task):
    """FloorWatch (pack's measuring process) stops a smoke run after a batch only when even a
    perfect score on every input not yet run leaves the mean under the floor: a run it stops
    always misses the floor in full, and one it never stops is the full run, whatever the
    scores and the batch sizes."""
    import torch

    from edgepack.smoke import FloorWatch, best_possible, compare

    gen = torch.Generator().manual_seed(0)
    total, outcomes = 16, set()
    for _ in range(200):
        if task == "text-generation":
            want = torch.randint(0, 5, (total, 8), generator=gen)
            keep = torch.rand(total, 8, generator=gen) < torch.rand(total, 1, generator=gen) ** 0.3
            expected = {"tokens": want, "logits": torch.zeros(total, 3)}
            actual = {"tokens": torch.where(keep, want, -1), "logits": torch.zeros(total, 3)}
        else:
            base = torch.randn(total, 6, generator=gen)
            expected = {"embeddings": base}
            actual = {"embeddings": base + torch.rand(total, 1, generator=gen) * torch.randn(total, 6, generator=gen)}
        full = compare(expected, actual, task).value
        floor = float(torch.rand((), generator=gen)) * 0.5 + 0.5
        watch, stopped = FloorWatch(expected, task, floor), False
        while watch.done < total and not stopped:
            begin = watch.done
            end = min(total, begin + int(torch.randint(1, 5, (), generator=gen)))
            stopped = watch({k: v[begin:end] for k, v in actual.items()})
            head = compare({k: v[:end] for k, v in expected.items()}, {k: v[:end] for k, v in actual.items()}, task)
            # the decision is the bound on this prefix's own fidelity, computed apart
            assert watch.done == end and stopped == (end < total and best_possible(head.value, end, total) < floor)
        if stopped:
            assert full < floor  # never wrong: the full run misses the floor too
        outcomes.add(stopped)
    assert outcomes == {True, False}  # both cases were met


def test_a_candidate_below_the_floor_is_rejected_on_its_first_inputs(tmp_path):
    """pack's measuring process stops a candidate once its first outputs prove it below the
    floor: the rejection says how far it got and what it could reach at most; the same plan at
    a floor it can meet runs every input."""
    from edgepack.errors import VerificationError
    from edgepack.pipeline import pack

    model = build_decoder("llama", tmp_path / "model", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                          num_attention_heads=4, num_key_value_heads=2)
    lines: list[str] = []
    with pytest.raises(VerificationError, match=r"top1_agreement at most 0\.\d+ \(the first \d+ of \d+ smoke inputs"):
        pack(model, target="cpu", out=tmp_path / "out", apply=["quantize:scheme=int4,method=rtn,group_size=128"],
             min_fidelity=0.999, seq_len=16, progress=lines.append)
    assert any("smoke inputs: at most" in line for line in lines), lines
    result = pack(model, target="cpu", out=tmp_path / "out", apply=["quantize:scheme=int4,method=rtn,group_size=128"],
                  min_fidelity=0.05, seq_len=16, progress=lambda message: None)
    assert 0.05 <= result.manifest["candidates"][0]["measured"]["fidelity"] < 0.999
    assert "inputs_run" not in result.manifest["candidates"][0]["measured"]
    # how the model card and `report` show each kind of record
    from edgepack.planner import format_measured_fidelity

    assert format_measured_fidelity({"peak_bytes": 1, "fidelity_at_most": 0.8, "inputs_run": 5}) == "<= 0.8 (5 inputs run)"
    assert format_measured_fidelity(result.manifest["candidates"][0]["measured"]) == str(
        result.manifest["candidates"][0]["measured"]["fidelity"])
    assert format_measured_fidelity(None) == "-"
