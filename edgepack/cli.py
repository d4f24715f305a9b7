"""The ``edgepack`` command line: parse, call the library, print.

Exit codes: 0 success; 1 a verification or smoke failure (a bad, untrusted, expired or missing
signature included); 2 bad usage or bad input (a key file that is not a key included); 3 no plan
fits the budget. Errors are one sentence on standard error.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from edgepack import __version__
from edgepack.environment import progress_printer, quiet_libraries
from edgepack.errors import EdgepackError, UsageError, VerificationError


def _emit_json(data: Any) -> None:
    """Print one JSON object as the last line of standard output."""
    click.echo(json.dumps(data, sort_keys=True, default=str))


class EdgepackGroup(click.Group):
    """A click group that turns EdgepackError into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgepackError as exc:
            click.echo(f"edgepack: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except BrokenPipeError:  # the reader went away (| head): stop without a word, as Python advises
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(1)
        except OSError as exc:  # disk full, permission denied, a path that vanished
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"edgepack: error: {where}{exc.strerror or exc}", err=True)
            ctx.exit(2)


def _size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    from edgepack.memory import parse_size

    return parse_size(value, "--budget")  # UsageError: one line, exit 2 (EdgepackGroup)


@click.group(cls=EdgepackGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgepack")
def cli() -> None:
    """Package a PyTorch / Hugging Face model for one device under a memory budget.

    \b
    Examples:
      edgepack plan   ./all-MiniLM-L6-v2 --target cpu --budget 30MB
      edgepack pack   ./all-MiniLM-L6-v2 --target cpu --budget 100MB \\
                      --apply precision:dtype=bf16 --out dist/
      edgepack verify dist/all-minilm-l6-v2-0.1.0-cpu
      edgepack run    dist/all-minilm-l6-v2-0.1.0-cpu "An edge device has little memory."

    Exit codes: 0 ok, 1 verification failed, 2 bad input, 3 no plan fits the budget.
    """


# ---------------------------------------------------------------------------------------------
# discovery


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def targets(as_json: bool) -> None:
    """List hardware targets, what each finds on this machine, and the options that describe
    a device that is not here (pack for it with --target NAME:KEY=VALUE,...).

    \b
    Examples:
      edgepack targets --json
      edgepack pack ./model --target cuda:memory=8GB,capability=8.7 --out dist/
    """
    from edgepack.host import load_registry
    from edgepack.memory import format_size

    registry = load_registry()
    rows = []
    for name, entry in sorted(registry.targets.items()):
        target = entry.cls()
        probe = target.probe()
        rows.append({
            "name": name, "version": target.version, "distribution": entry.distribution,
            "description": target.description, "present": probe.present,
            "options": [{"name": o.name, "type": o.type.__name__, "help": o.help} for o in target.options],
            "usage": ",".join(o.describe() for o in target.options),
            "capacity_bytes": target.capacity(probe) if probe.present else None,
            "probe": probe.to_json(),
        })
    if as_json:
        _emit_json({"targets": rows})
        return
    for row in rows:
        state = f"present, capacity {format_size(row['capacity_bytes'])} per device" if row["present"] else "not present here"
        detail = row["probe"]["detail"] if row["present"] else {}
        if detail.get("emulated"):
            state += f" (emulated: {detail.get('reason') or 'on this machine'})"
        click.echo(f"{row['name']:<10} {state}")
        click.echo(f"{'':<10} {row['description']} [{row['distribution']}]")
        click.echo(f"{'':<10} capabilities: {', '.join(row['probe']['capabilities']) or '-'}")
        if row["options"]:
            click.echo(f"{'':<10} options: --target {row['name']}:{row['usage']}")
            for opt in registry.targets[row["name"]].cls.options:
                click.echo(f"{'':<12}{opt.describe()}  {opt.help}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plugins(as_json: bool) -> None:
    """List compression plugins with their kind, version, options, distribution and status
    (ok, broken: why, or disabled). A broken plugin is skipped; the others keep working.

    \b
    Example:
      edgepack plugins
    """
    from edgepack.host import load_registry

    registry = load_registry()
    rows = []
    for name, entry in sorted(registry.compressors.items()):
        cls = entry.cls
        rows.append({
            "name": name, "kind": cls.kind, "version": cls.version, "distribution": entry.distribution,
            "description": cls.description, "requires": sorted(cls.requires),
            "options": [{"name": o.name, "type": o.type.__name__, "choices": list(o.choices),
                         "default": o.default, "help": o.help} for o in cls.options],
        })
    problems = [s for s in registry.statuses if s.status != "ok"]
    if as_json:
        _emit_json({"plugins": [dict(row, status="ok") for row in rows],
                    "entry_points": [s.to_json() for s in registry.statuses]})
        return
    for row, (_, entry) in zip(rows, sorted(registry.compressors.items())):
        click.echo(f"{row['name']:<10} {row['kind']:<10} {row['version']:<8} {row['distribution']}  ok")
        click.echo(f"{'':<10} {row['description']}")
        for opt in entry.cls.options:
            click.echo(f"{'':<12}{opt.describe()}  {opt.help}")
    for status in problems:
        click.echo(f"{status.name:<10} {'-':<10} {'-':<8} {status.distribution}  {status.status}: {status.reason}")


# ---------------------------------------------------------------------------------------------
# plan and pack

_model_arg = click.argument("model", type=str)
_target_opt = click.option("--target", "-t", default=None, metavar="TARGET[:KEY=VALUE,...]",
                           help="Target (see `edgepack targets`), optionally describing a device that is not "
                                "here: cuda:memory=8GB,capability=8.7.  [default: cpu]")
_budget_opt = click.option("--budget", callback=_size_option, help="Memory per device: bytes or 30MB, 512MiB, 1.5GiB.")
_batch_opt = click.option("--batch", "batch_size", type=click.IntRange(min=1), default=None, help="Declared batch size.  [default: 1]")
_seq_opt = click.option("--seq-len", type=click.IntRange(min=1), default=None, help="Declared sequence length in tokens.  [default: 128]")
_fid_opt = click.option("--min-fidelity", type=click.FloatRange(0, 1), default=None,
                        help="Fidelity floor (mean cosine for encoders, top-1 agreement for decoders).")
_json_opt = click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
_plot_opt = click.option("--plot", default=None, metavar="FILE.png",
                         help="Also draw the candidates' peak memory against quality, with the budget, into a PNG "
                              "(needs matplotlib: pip install 'edgepack[plot]').")
_code_opt = click.option("--allow-code", is_flag=True,
                         help="Run the model's own Python code (config.json auto_map) - only after reading it.")


@cli.command()
@_model_arg
@_target_opt
@_budget_opt
@_batch_opt
@_seq_opt
@_fid_opt
@click.option("--cache-len", type=click.IntRange(min=1), default=None, help="Decoders: KV-cache length.")
@click.option("--work-memory", default=None, metavar="SIZE",
              help="Memory packing may use here: plans whose packing is estimated to need more are marked, "
                   "as pack would refuse them.")
@_plot_opt
@_code_opt
@_json_opt
def plan(model: str, target: str | None, budget: int | None, batch_size: int | None, seq_len: int | None,
         min_fidelity: float | None, cache_len: int | None, work_memory: str | int | None, plot: str | None,
         allow_code: bool, as_json: bool) -> None:
    """Show the candidate plans for MODEL on a target, without loading weights.

    Estimates every composition of the installed compressors' options that the target
    supports, and ranks those that fit the budget by quality cost, then size. --plot draws
    every candidate's estimated peak against its estimated quality cost, with the budget.

    \b
    Example:
      edgepack plan ./all-MiniLM-L6-v2 --target cpu --budget 30MB
      edgepack plan ./all-MiniLM-L6-v2 --target cpu --budget 30MB --plot plan.png
    """
    from edgepack.model import ModelSource
    from edgepack.planner import DEFAULT_FLOOR, explain, plan_model

    if plot is not None:
        from edgepack.report import require_plotting

        require_plotting(plot)
    source = ModelSource.open(model, allow_code=allow_code)  # read once: the plans and the task's default floor
    if work_memory is not None:
        from edgepack.memory import parse_size

        work_memory = parse_size(work_memory, "--work-memory")  # bad input before any work
    budget_obj, candidates = plan_model(
        source, target=target or "cpu", budget=budget, batch_size=batch_size or 1,
        seq_len=seq_len or 128, cache_len=cache_len, work_memory=work_memory,
    )
    task = source.facts.task
    floor = {"value": DEFAULT_FLOOR[task] if min_fidelity is None else min_fidelity,
             "source": "default for " + task if min_fidelity is None else "--min-fidelity"}
    rows = [c.to_json() for c in candidates]
    if plot is not None:
        from edgepack.report import Chart, save

        save([Chart.from_plan(rows, budget_obj.bytes_per_device,
                              f"{source.path.name} on {target or 'cpu'}: estimated before packing")], plot)
    if as_json:
        _emit_json({"budget": budget_obj.to_json(), "fidelity_floor": floor, "candidates": rows}
                   | ({"plot": plot} if plot else {}))
    else:
        click.echo(explain(candidates, budget_obj))
        click.echo(f"\nfidelity floor {floor['value']} ({floor['source']}): pack measures the plans that fit, "
                   f"in this order, and keeps the first that reaches it")
        if plot is not None:
            click.echo(f"chart: {plot}")


def _load_recipe(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    from edgepack.recipe import read_recipe

    return read_recipe(path)


@cli.command()
@_model_arg
@_target_opt
@_budget_opt
@click.option("--apply", "apply_", multiple=True, metavar="PLUGIN[:KEY=VALUE,...]",
              help="Fix the plan instead of letting the planner choose; repeat, in order.")
@click.option("--recipe", type=click.Path(dir_okay=False), default=None, help="An edgepack.toml whose keys mirror these flags (flags win).")
@_batch_opt
@_seq_opt
@click.option("--cache-len", type=click.IntRange(min=1), default=None,
              help="Decoders: KV-cache length (prompt plus generated tokens).  [default: seq-len + 8]")
@_fid_opt
@click.option("--version", "bundle_version", default=None, help="Semantic version of this bundle.  [default: 0.1.0]")
@click.option("--samples", type=click.Path(dir_okay=False), default=None, help="Smoke sample texts: a JSON list or one per line.")
@click.option("--devices", type=click.IntRange(min=1), default=None, help="How many devices a multi-device target has: --target multi-gpu --devices 4 is --target multi-gpu:devices=4.")
@click.option("--name", default=None, help="Bundle name.  [default: the model directory's name]")
@click.option("--archive", is_flag=True, default=None, help="Also write a deterministic .tar.gz of the bundle.")
@click.option("--force", is_flag=True, help="Replace an existing bundle of the same name.")
@click.option("--sign", "sign_key", default=None, metavar="KEY",
              help="Sign the bundle with this private key (edgepack keygen) before it is published.")
@click.option("--out", "-o", default=None, help="Directory to write the bundle into.  [required, or set in the recipe]")
@click.option("--shard-size", default=None, metavar="SIZE",
              help="Largest weights file: bigger weights are written as shards with an index "
                   "(model.safetensors.index.json; model.int4.safetensors.index.json and the like for plugins' "
                   "own formats), "
                   "so saving and loading hold one shard at a time.  [default: 1GB]")
@click.option("--work-memory", default=None, metavar="SIZE",
              help="Memory packing may use here: plans whose packing is estimated to need more are refused "
                   "before any work, with the figure. The source's weights are memory-mapped and do not count.")
@_code_opt
@_json_opt
def pack(model: str, target: str | None, budget: int | None, apply_: tuple[str, ...], recipe: str | None,
         batch_size: int | None, seq_len: int | None, cache_len: int | None, min_fidelity: float | None, bundle_version: str | None,
         samples: str | None, devices: int | None, name: str | None, archive: bool | None, force: bool,
         sign_key: str | None, out: str | None, shard_size: str | None, work_memory: str | None, allow_code: bool,
         as_json: bool) -> None:
    """Pack MODEL for a target under a memory budget into a verified bundle.

    MODEL is a local Hugging Face model directory (or a hub id already in the local cache;
    nothing is downloaded). Without --apply the planner picks the plan that fits the budget
    with the least loss of quality; the packed model is loaded in a fresh process, its peak
    memory measured and its outputs compared with the original's before the bundle is written.

    \b
    Examples:
      edgepack pack ./all-MiniLM-L6-v2 --target cpu --budget 100MB \\
          --apply precision:dtype=bf16 --out dist/
      edgepack pack ./all-MiniLM-L6-v2 --target cpu --budget 30MB --out dist/
      edgepack pack ./all-MiniLM-L6-v2 --target multi-gpu --devices 2 --budget 70MB --out dist/
    """
    from edgepack import pipeline
    from edgepack.recipe import merge

    recipe_settings = _load_recipe(recipe)
    flags = {
        "target": target, "budget": budget, "apply": list(apply_) or None, "batch_size": batch_size,
        "seq_len": seq_len, "cache_len": cache_len, "min_fidelity": min_fidelity, "version": bundle_version,
        "samples": samples, "devices": devices, "name": name, "archive": archive, "out": out,
        "force": force or None, "sign": sign_key, "shard_size": shard_size,
        "work_memory": work_memory,
    }
    workload, requests = merge(recipe_settings, flags)
    if not all(r.get("out") for r in requests):
        raise UsageError("missing option --out (or 'out' in the recipe)")
    if "targets" in recipe_settings:
        _pack_many(model, workload, requests, as_json, allow_code)
        return
    result = pipeline.pack(model, progress=progress_printer(as_json), allow_code=allow_code, **workload, **requests[0])
    _print_result(result)
    if as_json:
        _emit_json(result.to_json())


def _pack_many(model: str, workload: dict[str, Any], requests: list[dict[str, Any]], as_json: bool,
               allow_code: bool = False) -> None:
    """Several targets from one recipe: one bundle each; a failure stops only its target."""
    from edgepack import pipeline

    outcomes = pipeline.pack_many(model, requests, progress=progress_printer(as_json), allow_code=allow_code, **workload)
    for outcome in outcomes:
        if outcome.result is not None:
            _print_result(outcome.result)
        else:
            click.echo(f"target    {outcome.target}: FAILED: {outcome.error}")
        click.echo("")
    failed = [o for o in outcomes if o.error is not None]
    if as_json:
        _emit_json({
            "bundles": [o.result.to_json() for o in outcomes if o.result is not None],
            "failures": [{"target": o.target, "exit_code": o.error.exit_code, "detail": str(o.error)} for o in failed],
        })
    if failed:
        sys.exit(failed[0].error.exit_code)


def _plan_text(plan: list[dict[str, Any]]) -> str:
    """``prune:ffn=0.25 + quantize:scheme=int8`` from a manifest's plan, ``(none)`` when empty."""
    from edgepack.interfaces import PlanStep

    return " + ".join(PlanStep(s["plugin"], s["version"], s["options"]).spec() for s in plan) or "(none)"


def _loads_with(manifest: dict[str, Any]) -> str:
    """How a bundle's model is loaded, in words."""
    if isinstance(manifest.get("parallel"), dict):
        return f"one process per rank ({manifest['parallel']['world_size']} ranks, torchrun)"
    loader = manifest["model"]["loader"]
    return "stock transformers" if loader is None else f"edgepack.load ({loader})"


def _print_result(result: Any) -> None:
    from edgepack.memory import format_peak, format_size

    mem = result.manifest["memory"]
    fid = result.manifest["fidelity"]
    lines = [
        f"bundle    {result.bundle}",
        f"plan      {_plan_text(result.manifest['plan'])}",
        f"size      {format_size(result.size_bytes)}",
        f"content   {result.manifest['content']['digest']}",
        f"memory    predicted {format_size(mem['predicted_peak_bytes'])}, measured {format_peak(mem['measured_peak_bytes'])}, budget {format_size(mem['budget_bytes'])}",
        f"fidelity  {fid['metric']} {fid['value']} (floor {fid['floor']})",
    ]
    if result.archive:
        lines.append(f"archive   {result.archive}")
    if result.signed_by:
        lines.append(f"signed    by key {result.signed_by}")
    click.echo("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# bundles


@cli.command()
@click.argument("bundle", type=str)
@click.option("--key", "keys", multiple=True, metavar="PUB",
              help="A trusted public key (NAME.pub); repeat: any of them may have signed. A signature is then required.")
@click.option("--min-version", default=None, metavar="V",
              help="Refuse a bundle whose version is older than V (PEP 440): no rollback.")
@click.option("--digest", default=None, metavar="sha256:HEX",
              help="Require this content digest: the bundle you approved (edgepack inspect prints it).")
@_code_opt
@_json_opt
def verify(bundle: str, keys: tuple[str, ...], min_version: str | None, digest: str | None, allow_code: bool,
           as_json: bool) -> None:
    """Verify BUNDLE on this machine before release.

    Checks the format version and schema, every file's size and sha256 (changed, missing and
    unlisted files are named), the content digest (with --digest: that it is the approved
    one), the signature (with --key: signed by one of those keys, not expired), the bundle
    version (--min-version), loads the model on the bundle's target in a
    fresh process, compares the smoke outputs with the golden outputs, and checks peak memory
    against the budget. Exit 0 when all hold, 1 otherwise.

    \b
    Examples:
      edgepack verify dist/all-minilm-l6-v2-0.1.0-cpu --json
      edgepack verify dist/all-minilm-l6-v2-0.1.0-cpu --key release.pub --min-version 0.1.0
      edgepack verify dist/all-minilm-l6-v2-0.1.0-cpu.tar.gz --digest sha256:3f0c...
    """
    from edgepack.bundle.verify import verify as run_verify
    from edgepack.memory import format_size

    report = run_verify(bundle, progress=progress_printer(as_json), keys=keys, min_version=min_version, digest=digest,
                        allow_code=allow_code)
    if report.ok:
        click.echo(f"ok: {report.bundle}")
        if report.content_digest:
            click.echo(f"  content {report.content_digest}")
        if report.fidelity:
            click.echo(f"  fidelity {report.fidelity['metric']} {report.fidelity['value']}")
        if report.rank_peak_bytes is not None:
            for rank, peak in enumerate(report.rank_peak_bytes):
                click.echo(f"  rank {rank} peak memory {format_size(peak)} of {format_size(report.budget_bytes)} budget per device")
        elif report.measured_peak_bytes is not None:
            click.echo(f"  peak memory {format_size(report.measured_peak_bytes)} of {format_size(report.budget_bytes)} budget")
        if report.signature is not None:
            click.echo(f"  signature {report.signature['detail']}")
        if report.untrusted_keys:
            click.echo(f"  note: manifest keys {', '.join(report.untrusted_keys)} are from a newer format "
                       f"version; kept, but not checked or used")
    else:
        click.echo(f"FAILED: {report.bundle}")
        for failure in report.failures:
            click.echo(f"  [{failure.check}] {failure.path}: {failure.detail}")
    if as_json:
        _emit_json(report.to_json())
    sys.exit(0 if report.ok else 1)


@cli.command()
@click.option("--out", required=True, metavar="NAME", help="Write NAME.key (private, mode 0600) and NAME.pub.")
@_json_opt
def keygen(out: str, as_json: bool) -> None:
    """Create an Ed25519 key pair for signing bundles: NAME.key and NAME.pub.

    Keep NAME.key secret, on the signing machine only (never in a bundle or a repository);
    give NAME.pub to whoever runs `edgepack verify --key`. Existing files are never replaced.

    \b
    Example:
      edgepack keygen --out release
    """
    from edgepack.bundle.signing import keygen as make_keys

    files = make_keys(out)
    click.echo(f"private key  {files.private}  (mode 0600: keep it secret)")
    click.echo(f"public key   {files.public}")
    click.echo(f"fingerprint  {files.fingerprint}")
    if as_json:
        _emit_json({"private": str(files.private), "public": str(files.public), "fingerprint": files.fingerprint})


@cli.command()
@click.argument("bundle", type=str)
@click.option("--key", required=True, metavar="KEY", help="The private key (NAME.key from edgepack keygen).")
@click.option("--expires", default=None, metavar="DATE|DAYS",
              help="The signature expires after DAYS days, or at 00:00 UTC on DATE (2027-01-31).")
@_json_opt
def sign(bundle: str, key: str, expires: str | None, as_json: bool) -> None:
    """Sign BUNDLE (a directory or a .tar.gz archive) with a private key.

    The bundle's manifest and every file's hash are checked first. The signature covers the
    manifest's exact bytes (which list every file's sha256), the signing time and the expiry;
    it is written to manifest.sig.json beside the manifest (replacing an earlier signature), so
    the manifest itself does not change. An archive is re-packed and replaced in one rename.

    \b
    Example:
      edgepack sign dist/all-minilm-l6-v2-0.1.0-cpu --key release.key --expires 365
    """
    from edgepack.bundle.signing import load_private_key, parse_expires, sign as sign_bundle

    private_key = load_private_key(key)
    until = parse_expires(expires) if expires is not None else None
    document = sign_bundle(bundle, private_key, expires=until)
    click.echo(f"signed {bundle} with key {document['key']}"
               + (f", expires {document['expires']}" if document["expires"] else ""))
    if as_json:
        _emit_json({"bundle": bundle, "signature": {k: document[k] for k in ("key", "signed_at", "expires")}})


@cli.command()
@click.argument("bundle", type=str)
@click.option("--source", "model", required=True, metavar="MODEL",
              help="The source model the bundle was packed from (its weights' sha256 must match the manifest's).")
@click.option("--samples", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The smoke samples file the bundle was packed with, if it was.")
@click.option("--out", default=None, metavar="DIR", help="Keep the rebuilt bundle in DIR (default: a temporary directory, removed).")
@_code_opt
@_json_opt
def rebuild(bundle: str, model: str, samples: str | None, out: str | None, allow_code: bool, as_json: bool) -> None:
    """Pack BUNDLE's recorded plan again from --source and compare the content.

    The rebuild uses the target, options, workload, plan, name and version the manifest
    records, and compares its content digest with the bundle's: the plan and options, and
    every file of model/ and smoke/ by sha256 (not the measured memory, the machine's probe or
    the time, which vary by nature). Each difference is named. Exit 0 when the digests are
    equal, 1 when they differ or MODEL is not the recorded source.

    \b
    Examples:
      edgepack rebuild dist/all-minilm-l6-v2-0.1.0-cpu --source ./all-MiniLM-L6-v2
      SOURCE_DATE_EPOCH=1700000000 edgepack rebuild dist/x-0.1.0-cpu.tar.gz --source ./x --json
    """
    from edgepack.pipeline import rebuild as run_rebuild

    result = run_rebuild(bundle, model, samples=samples, out=out, progress=progress_printer(as_json), allow_code=allow_code)
    if result.identical:
        click.echo(f"identical: {result.bundle}")
        click.echo(f"  content {result.rebuilt} ({result.compared_files} files of model/ and smoke/ compared)")
    else:
        click.echo(f"DIFFERS: {result.bundle}")
        click.echo(f"  recorded content {result.recorded}")
        click.echo(f"  rebuilt content  {result.rebuilt}")
        for key, detail in result.differences:
            click.echo(f"  {key}: {detail}")
    if result.kept:
        click.echo(f"  rebuilt bundle kept at {result.kept}")
    if as_json:
        _emit_json(result.to_json())
    sys.exit(0 if result.identical else 1)


@cli.command()
@click.argument("bundle_a", type=str)
@click.argument("bundle_b", type=str)
@_json_opt
def diff(bundle_a: str, bundle_b: str, as_json: bool) -> None:
    """Show what differs between two bundles (directories or archives).

    The content (what the content digest covers: plan, target, workload, every file of model/
    and smoke/ by sha256) decides the exit code: 0 when identical, 1 when not. The record of
    each build (fidelity, predicted and measured memory, budget, producing versions, time) is
    shown beside it. Both bundles are integrity-checked first.

    \b
    Example:
      edgepack diff dist/old/all-minilm-l6-v2-1.3.0-cpu dist/all-minilm-l6-v2-1.4.0-cpu
    """
    from edgepack.bundle.diff import diff_bundles
    from edgepack.bundle.manifest import CONTENT_EXCLUDED_FILES
    from edgepack.memory import format_peak, format_size

    result = diff_bundles(bundle_a, bundle_b)
    if as_json:
        _emit_json(result.to_json())
        sys.exit(0 if result.identical else 1)

    def show(label: str, value: Any) -> str:
        if value is None:
            return "-"
        if label.endswith("bytes"):
            return format_peak(value) if isinstance(value, list) else format_size(value)
        if isinstance(value, dict):
            return ", ".join(f"{k} {v}" for k, v in sorted(value.items())) or "-"
        return str(value)

    click.echo(f"A  {result.a}  ({result.digest_a})")
    click.echo(f"B  {result.b}  ({result.digest_b})")
    if result.identical:
        click.echo("content identical")
    else:
        click.echo("content differs:")
        for key, detail in result.content:
            if key in result.sizes:
                continue
            click.echo(f"  {key}: {detail}")
        for path, (size_a, size_b) in result.sizes.items():
            click.echo(f"  {path:<40} {show('bytes', size_a):>10} -> {show('bytes', size_b):>10}"
                       + ("   (model card, not content)" if path in CONTENT_EXCLUDED_FILES else ""))
    if result.record:
        click.echo("record (how each was built and measured; not content):")
        for label, value_a, value_b in result.record:
            click.echo(f"  {label:<22} {show(label, value_a)} -> {show(label, value_b)}")
    sys.exit(0 if result.identical else 1)


def _manifest_of(bundle: str) -> dict[str, Any]:
    """BUNDLE's manifest (a directory or an archive), schema-checked but not verified; an
    unreadable bundle or manifest is bad input (exit 2)."""
    from edgepack.bundle.reader import open_path, read_manifest

    try:
        root = open_path(bundle)
    except VerificationError as exc:  # an unreadable archive
        raise UsageError(str(exc)) from None
    manifest, failures = read_manifest(root)
    if manifest is None:
        raise UsageError(f"{root}: {failures[0].path}: {failures[0].detail}")
    return manifest


@cli.command()
@click.argument("bundle", type=str)
@_json_opt
def inspect(bundle: str, as_json: bool) -> None:
    """Summarise BUNDLE's manifest: source, plan, memory, fidelity, files.

    \b
    Example:
      edgepack inspect dist/all-minilm-l6-v2-0.1.0-cpu
    """
    from edgepack.memory import format_peak, format_size

    manifest = _manifest_of(bundle)
    if as_json:
        _emit_json(manifest)
        return
    b, mem, fid = manifest["bundle"], manifest["memory"], manifest["fidelity"]
    plan_text = _plan_text(manifest["plan"])
    total = sum(f["size"] for f in manifest["files"])
    click.echo(f"{b['name']} {b['version']} for {manifest['target']['name']}  (format {manifest['format_version']}, created {b['created']})")
    click.echo(f"  source     {manifest['source']['model']}")
    click.echo(f"  model      {manifest['model'].get('architecture')} ({manifest['model']['task']}), "
               f"loads with {_loads_with(manifest)}")
    click.echo(f"  plan       {plan_text}")
    click.echo("  workload   " + ", ".join(f"{k}={v}" for k, v in sorted(manifest["workload"].items())))
    click.echo(f"  budget     {format_size(mem['budget_bytes'])} per device ({manifest['budget']['source']})")
    click.echo(f"  memory     predicted {format_size(mem['predicted_peak_bytes'])}, measured {format_peak(mem['measured_peak_bytes'])}")
    click.echo(f"  fidelity   {fid['metric']} {fid['value']} (floor {fid['floor']})")
    parallel = manifest.get("parallel")
    if isinstance(parallel, dict):
        click.echo(f"  shards     {parallel['world_size']} ranks, {parallel['mode']} parallel ({parallel.get('backend')}); "
                   f"each rank reads only its own shard")
        peaks = mem["measured_peak_bytes"] if isinstance(mem["measured_peak_bytes"], list) else []
        for rank, shard in enumerate(parallel["shards"]):
            size = sum(f["size"] for f in manifest["files"] if f["path"].startswith(shard + "/"))
            measured = f", measured peak {format_size(peaks[rank])}" if rank < len(peaks) else ""
            click.echo(f"               rank {rank}  {shard + '/':<16} {format_size(size):>10}{measured}")
        click.echo(f"  launch     {parallel['launch']}")
    click.echo(f"  files      {len(manifest['files'])} files, {format_size(total)}")
    for f in manifest["files"]:
        click.echo(f"               {f['path']:<40} {format_size(f['size']):>10}  {f['sha256'][:12]}")
    content = manifest.get("content")
    click.echo(f"  content    {content['digest']}" if isinstance(content, dict) else
               f"  content    no content digest (format {manifest['format_version']})")
    click.echo(f"  candidates {len(manifest['candidates'])} considered")


@cli.command()
@click.argument("bundles", nargs=-1, required=True)
@_plot_opt
@_json_opt
def report(bundles: tuple[str, ...], plot: str | None, as_json: bool) -> None:
    """Compare packed BUNDLES (directories or archives) side by side: plan, size, budget,
    predicted and measured peak memory, fidelity, and the candidates each pack weighed.

    It reads the manifests and checks their schema; it does not verify the weights
    (edgepack verify does). --plot draws one chart per bundle: measured peak memory against
    measured fidelity for the candidates pack measured, the estimate of the others, the budget
    and the floor.

    \b
    Examples:
      edgepack report dist/all-minilm-l6-v2-0.1.0-cpu dist/all-minilm-l6-v2-0.1.0-executorch
      edgepack report dist/*-cpu --plot report.png
    """
    from edgepack.memory import format_peak, format_size
    from edgepack.planner import format_measured_fidelity

    if plot is not None:
        from edgepack.report import require_plotting

        require_plotting(plot)
    manifests = [_manifest_of(b) for b in bundles]
    if plot is not None:
        from edgepack.report import Chart, save

        save([Chart.from_manifest(m) for m in manifests], plot)
    rows = []
    for path, m in zip(bundles, manifests):
        mem, fid = m["memory"], m["fidelity"]
        candidates = [c for c in m["candidates"] if isinstance(c, dict)]
        rows.append({
            "bundle": path, "name": m["bundle"]["name"], "version": m["bundle"]["version"],
            "target": m["target"]["name"], "plan": _plan_text(m["plan"]),
            "files": len(m["files"]), "files_bytes": sum(f["size"] for f in m["files"]),
            "budget_bytes": mem["budget_bytes"], "predicted_peak_bytes": mem["predicted_peak_bytes"],
            "measured_peak_bytes": mem["measured_peak_bytes"],
            "fidelity": {"metric": fid["metric"], "value": fid["value"], "floor": fid["floor"]},
            "candidates": {"considered": len(candidates), "fit_estimate": sum(1 for c in candidates if c.get("fits")),
                           "measured": sum(1 for c in candidates if isinstance(c.get("measured"), dict))},
            "measured": [{"spec": c.get("spec"), "estimated_peak_bytes": c.get("estimated_peak_bytes"),
                          "measured": c["measured"], "chosen": bool(c.get("chosen")),
                          "rejected_because": c.get("rejected_because")}
                         for c in candidates if isinstance(c.get("measured"), dict)],
        })
    if as_json:
        _emit_json({"bundles": rows} | ({"plot": plot} if plot else {}))
        return
    for row in rows:
        n = row["candidates"]
        fid = row["fidelity"]
        click.echo(f"{row['name']} {row['version']} for {row['target']}  ({row['bundle']})")
        click.echo(f"  plan       {row['plan']}")
        click.echo(f"  files      {row['files']} files listed, {format_size(row['files_bytes'])}")
        click.echo(f"  memory     predicted {format_size(row['predicted_peak_bytes'])}, measured "
                   f"{format_peak(row['measured_peak_bytes'])}, budget {format_size(row['budget_bytes'])}")
        click.echo(f"  fidelity   {fid['metric']} {fid['value']} (floor {fid['floor']})")
        click.echo(f"  candidates {n['considered']} considered, {n['fit_estimate']} fit by estimate, {n['measured']} measured:")
        for c in row["measured"]:
            outcome = "chosen" if c["chosen"] else (c["rejected_because"] or "-")
            click.echo(f"    {c['spec'] or '(unnamed)':<44} est. {format_size(c['estimated_peak_bytes']):>9}  measured "
                       f"{format_size(c['measured'].get('peak_bytes')):>9}  {format_measured_fidelity(c['measured'])}  {outcome}")
    if plot is not None:
        click.echo(f"chart: {plot}")


_compile_opt = click.option(
    "--compile", "compiled", is_flag=True,
    help="Run compiled (torch.compile): decoders' decoding steps (with a static KV cache), encoders' forward "
         "pass. The first call of a shape compiles (tens of seconds on a CPU; needs a C++ compiler there), later "
         "ones run faster (see \"Speed\" in the README). Late greedy tokens may differ from eager decoding where "
         "two logits nearly tie; verify always runs eager.")


@cli.command()
@click.argument("bundle", type=str)
@click.argument("inputs", nargs=-1)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, help="Decoders: tokens to generate.")
@click.option("--key", "keys", multiple=True, metavar="PUB",
              help="Run only a bundle signed by this trusted public key (repeat: any of them).")
@_compile_opt
@_code_opt
@_json_opt
def run(bundle: str, inputs: tuple[str, ...], max_new_tokens: int, keys: tuple[str, ...], compiled: bool,
        allow_code: bool, as_json: bool) -> None:
    """Load BUNDLE and run it on INPUT texts (or lines of standard input).

    Encoders print sentence embeddings (mean-pooled, normalised); decoders print greedy
    continuations. The bundle's file hashes are checked first, and its signature when it has
    one (with --key, it must have one, by one of those keys).

    \b
    Examples:
      edgepack run dist/all-minilm-l6-v2-0.1.0-cpu "An edge device has little memory."
      edgepack run dist/all-minilm-l6-v2-0.1.0-cpu --key release.pub "Signed bundles only."
    """
    from edgepack.runtime import open_bundle

    texts = list(inputs)
    if not texts and not sys.stdin.isatty():
        texts = [line.strip() for line in sys.stdin if line.strip()]
    if not texts:
        raise UsageError("give at least one INPUT text (or pipe lines on standard input)")
    extra: dict[str, Any] = {}
    manifest = _unverified_manifest(bundle)  # only to choose how to run it; loading verifies it
    if compiled and manifest is not None:  # refused before anything loads
        from edgepack.runtime import compile_refusal

        refusal = compile_refusal(manifest, os.path.basename(os.path.normpath(bundle)))
        if refusal:
            raise UsageError(refusal)
    if manifest is not None and isinstance(manifest.get("parallel"), dict):  # every rank through torchrun (rank 0's outputs)
        from edgepack.runtime import run_sharded

        result = run_sharded(bundle, texts, max_new_tokens=max_new_tokens, progress=progress_printer(as_json), keys=keys)
        task = "text-generation" if "texts" in result else "feature-extraction"
        generated, vectors = result.get("texts"), result.get("embeddings")
        extra = {"rank_peak_bytes": result["rank_peak_bytes"]}
    else:
        session = open_bundle(bundle, keys=keys, allow_code=allow_code)
        task = session.task
        generated = (session.generate(texts, max_new_tokens=max_new_tokens, compiled=compiled)
                     if task == "text-generation" else None)
        vectors = session.embed(texts, compiled=compiled) if generated is None else None
    if as_json:
        if generated is not None:
            _emit_json({"task": task, "outputs": [{"input": t, "output": o} for t, o in zip(texts, generated)], **extra})
        else:
            _emit_json({"task": task, "dim": int(vectors.shape[1]), **extra,
                        "embeddings": [[round(float(x), 6) for x in row] for row in vectors]})
        return
    if generated is not None:
        for text, output in zip(texts, generated):
            click.echo(f"{text}{output}")
    else:
        for text, row in zip(texts, vectors):
            head = ", ".join(f"{float(x):+.4f}" for x in row[:6])
            click.echo(f"{text!r}\n  dim {row.shape[0]}, norm {float(row.norm()):.4f}: [{head}, ...]")
        if len(texts) > 1:
            sims = vectors @ vectors.T
            click.echo("cosine similarities:")
            for i in range(len(texts)):
                click.echo("  " + " ".join(f"{float(sims[i, j]):.3f}" for j in range(len(texts))))
    if extra:
        from edgepack.memory import format_size

        click.echo(f"ran on {result['world_size']} ranks ({result['device']}); peak memory per rank "
                   "(one-time runtime costs included): " + ", ".join(format_size(p) for p in extra["rank_peak_bytes"]))


def _unverified_manifest(bundle: str) -> dict[str, Any] | None:
    """BUNDLE's manifest as read, before any check (None when it cannot be read: loading then
    reports why); for choosing how to run it, never for trusting it."""
    from edgepack.bundle.reader import open_path, read_manifest

    try:
        manifest, _ = read_manifest(open_path(bundle))
    except EdgepackError:
        return None
    return manifest if isinstance(manifest, dict) else None


@cli.command()
@click.argument("bundle", type=str)
@click.option("--repeats", type=click.IntRange(min=1), default=10, help="Timed runs after the first (warm-up) one.")
@click.option("--source", "source", metavar="MODEL|BUNDLE", default=None,
              help="The model to compare with: a model directory, or another bundle of the same task (for "
                   "example the cpu bundle beside an executorch one).  [default: the manifest's source path, "
                   "when it still holds the weights the bundle was packed from]")
@click.option("--no-source", is_flag=True, help="Time the bundle alone.")
@_compile_opt
@_code_opt
@_json_opt
def bench(bundle: str, repeats: int, source: str | None, no_source: bool, compiled: bool, allow_code: bool,
          as_json: bool) -> None:
    """Time BUNDLE on this machine at its declared workload (batch, sequence length): latency
    p50 and p95, throughput, load time and peak memory, beside the source model measured the
    same way in the same run (its timed runs interleaved with the bundle's); decoders also
    batch-1 prefill latency and decode tokens/s.

    \b
    Examples:
      edgepack bench dist/all-minilm-l6-v2-0.1.0-cpu --repeats 20
      edgepack bench dist/all-minilm-l6-v2-0.1.0-cpu --source ./all-MiniLM-L6-v2
      edgepack bench dist/all-minilm-l6-v2-0.1.0-executorch --source dist/all-minilm-l6-v2-0.1.0-cpu
    """
    from edgepack.memory import format_size
    from edgepack.runtime import benchmark

    if source is not None and no_source:
        raise UsageError("--source and --no-source contradict each other; give one")
    result = benchmark(bundle, repeats=repeats, source=source, allow_code=allow_code, compare_source=not no_source,
                       compiled=compiled, progress=progress_printer(as_json))
    if as_json:
        _emit_json(result)
        return
    click.echo(f"{result['bundle']}: batch {result['batch_size']} x {result['seq_len']} tokens on {result['device']}, "
               f"{repeats} timed runs")
    if "rank_peak_bytes" in result:
        click.echo(f"  p50 {result['p50_ms']:.2f} ms, p95 {result['p95_ms']:.2f} ms, {result['throughput_per_s']:.1f} seq/s"
                   + (f", {result['tokens_per_s']:.1f} tokens/s" if "tokens_per_s" in result else ""))
        click.echo("  peak memory per rank: " + ", ".join(format_size(p) for p in result["rank_peak_bytes"]))
        return
    rows = [("bundle", result)] + ([("source", result["source"])] if "source" in result else [])
    click.echo(f"  {'':8}{'p50':>11}{'p95':>11}{'throughput':>14}{'load':>9}{'peak memory':>13}")
    for name, row in rows:
        compiled_note = f"  compiled (compiling took {row['compile_s']:.1f} s)" if "compile_s" in row and \
            "prefill_ms" not in row else ""
        click.echo(f"  {name:8}{row['p50_ms']:>8.2f} ms{row['p95_ms']:>8.2f} ms{row['throughput_per_s']:>8.1f} seq/s"
                   f"{row['load_s']:>7.2f} s{format_size(row['peak_bytes']):>13}{compiled_note}")
    if "source" in result:
        click.echo(f"  the bundle runs at {result['speedup']:.2f}x the source's speed in "
                   f"{result['memory_ratio']:.2f}x its memory ({result['source']['model']})")
    elif result.get("source_skipped"):
        click.echo(f"  not compared: {result['source_skipped']}")
    if "prefill_ms" in result:
        for name, row in rows:
            compiled_note = f" compiled (compiling took {row['compile_s']:.1f} s)" if "compile_s" in row else ""
            click.echo(f"  {name} batch 1: prefill {row['prefill_ms']:.2f} ms, decoding {row['tokens_per_s']:.1f} "
                       f"tokens/s{compiled_note}")
        click.echo(f"  (decoding: median of runs generating {result['new_tokens']} tokens, less the prefill"
                   + (f"; the bundle decodes at {result['decode_speedup']:.2f}x)" if "decode_speedup" in result else ")"))


def _show_plugin_warnings() -> None:
    """Print each skipped plugin once, as one line on standard error."""
    import warnings

    from edgepack.host import PluginWarning

    default = warnings.showwarning

    def show(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
        if issubclass(category, PluginWarning):
            click.echo(f"edgepack: warning: {message}", err=True)
        else:
            default(message, category, *args, **kwargs)

    warnings.showwarning = show
    warnings.simplefilter("once", PluginWarning)


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into an orderly exit (code 143), so that the cleanup on the way out runs:
    a half-written bundle is removed, and the measuring processes and ranks are killed."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (embedded use): leave the handler alone
        pass


def main() -> None:
    """Console-script entry point: adds plugin commands, then runs the group."""
    _exit_on_sigterm()
    quiet_libraries()
    _show_plugin_warnings()
    try:
        from edgepack.host import make_plugin_manager

        make_plugin_manager().hook.edgepack_register_commands(cli=cli)
    except EdgepackError as exc:
        click.echo(f"edgepack: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a plugin's command hook must not take the tool down
        click.echo(f"edgepack: warning: a plugin's edgepack_register_commands failed: {type(exc).__name__}: {exc}",
                   err=True)
    cli(prog_name="edgepack")


if __name__ == "__main__":  # pragma: no cover
    main()
