"""The `dit-graft` command line: convert, plan, validate, inspect, eval, operators, recipes."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dit_graft.cost import model_cost
from dit_graft.errors import DitGraftError, InputError, IntegrityError, RecipeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Convert pretrained Diffusion Transformers into cheaper students.",
)
console = Console(stderr=True)
out_console = Console(width=None if sys.stdout.isatty() else 140)
_state = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


# the memory plan's options, shared by convert (--dry-run) and plan
DeviceMemoryOption = Annotated[
    str | None,
    typer.Option(
        "--device-memory",
        help="Device size for the memory plan (80GB, 141GB, 79.6GiB); default: the local GPU's, else 80GB.",
    ),
]
ProcessesOption = Annotated[
    int | None,
    typer.Option(min=1, help="Processes (GPUs) for the memory plan; default: WORLD_SIZE, else 1."),
]


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _load_teacher(recipe, recipe_path: Path, meta: bool, check_out: Path | None = None):
    """Resolves and loads the recipe's teacher; with `check_out`, first refuses a bad output path."""
    from dit_graft.pipeline import load_teacher
    from dit_graft.recipe import recipe_dir

    return load_teacher(recipe, recipe_dir(recipe_path), meta=meta, check_out=check_out)


def _check_family(model) -> None:
    from dit_graft.families import family_for

    try:
        family_for(model)
    except KeyError as e:
        raise RecipeError(f"model: {e.args[0]}") from None


def _plan(model, recipe):
    from dit_graft.plan import plan

    _check_family(model)
    return plan(model, recipe)


def _plan_meta(model, recipe):
    """Plans on a weightless model: automatic layers become an evenly spread placeholder, with a note."""
    from dit_graft.autoselect import has_auto, placeholder

    notes = []
    if has_auto(recipe):
        _check_family(model)
        recipe, notes = placeholder(model, recipe)
    for note in notes:
        console.print(f"[yellow]note[/yellow]: {note}")
    return _plan(model, recipe)


def _print_plan(graft_plan, before: dict, after: dict) -> None:
    formula = {*before.get("attention_formula", ()), *after.get("attention_formula", ())}
    caption = (
        "* = q/k/v/out projections measured by FlopCounterMode + the operator's attention-core FLOP formula "
        "(the work its kernel does: masked/sparse attention counts only kept pairs, although its PyTorch path "
        "computes densely); unmarked = measured by FlopCounterMode"
    )
    table = Table(title="graft plan", show_lines=False, caption=caption if formula else None)
    for col in ("edit", "module", "old → new", "attn FLOPs before", "after"):
        table.add_column(col, no_wrap=col != "old → new")  # a depth edit's line (dropped blocks) may wrap

    def cell(cost: dict, path: str) -> str:
        flops = cost["attention_flops"].get(path)
        if flops is None:
            return "-"
        return _fmt(flops) + ("*" if path in cost.get("attention_formula", ()) else "")

    for e in graft_plan.edits:
        if e.layer_map is not None:
            from dit_graft.plan import describe_depth

            blocks = "blocks" if e.group in (None, "blocks") else f"{e.group} blocks"  # FLUX: double | single
            table.add_row(str(e.index), blocks, describe_depth(e), "-", "-")
        for m in e.modules:
            table.add_row(str(e.index), m.path, f"{m.old} → {m.new}", cell(before, m.path), cell(after, m.path))
    out_console.print(table)
    summary = Table(title="cost per image")
    for col in ("", "teacher", "student", "ratio"):
        summary.add_column(col)
    attn_b, attn_a = sum(before["attention_flops"].values()), sum(after["attention_flops"].values())
    for name, b, a in (
        ("parameters", before["params"], after["params"]),
        *(
            [("activated parameters", before["activated_params"], after["activated_params"])]
            if after.get("activated_params", after["params"]) != after["params"]
            else []
        ),
        ("FLOPs" + ("*" if formula else ""), before["flops"], after["flops"]),
        ("attention FLOPs" + ("*" if formula else ""), attn_b, attn_a),
    ):
        summary.add_row(name, _fmt(b), _fmt(a), f"{a / b:.3f}" if b else "-")
    out_console.print(summary)


@app.command()
def convert(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="A graft recipe (YAML).")],
    set_: Annotated[list[str], typer.Option("--set", help="Override KEY=VALUE (dotted path, list indices).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Export directory (default: the recipe's export.out).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only, on the meta device; no weights.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest complete checkpoint.")] = False,
    resolution: Annotated[
        list[str] | None,
        typer.Option(
            "--resolution",
            help="With --dry-run: image sizes in pixels to cost, repeated or comma-separated (256,512,1024,2048); "
            "default: the model's native size.",
        ),
    ] = None,
    device_memory: DeviceMemoryOption = None,
    processes: ProcessesOption = None,
) -> None:
    """Graft, distil and export a student as the recipe says."""
    from dit_graft.recipe import load_recipe, recipe_dir

    recipe = load_recipe(recipe_path, set_ or [])
    out_dir = out or Path(recipe.export.out)
    pixels = _parse_resolutions(resolution or [])
    if dry_run:
        _dry_run(recipe, recipe_path, pixels, _memory_device(device_memory), processes)
        return
    if pixels:
        raise InputError("--resolution: only with --dry-run (the distillation size is distill.resolution)")
    if device_memory is not None or processes is not None:
        raise InputError("--device-memory/--processes: only with --dry-run (the memory plan; `dit-graft plan` too)")
    if recipe.distill.conditions is not None:
        conditions = Path(recipe.distill.conditions).expanduser()
        if not conditions.is_absolute() and (recipe_dir(recipe_path) / conditions).is_file():
            conditions = recipe_dir(recipe_path) / conditions
        if not conditions.is_file():
            raise InputError(f"distill.conditions: {recipe.distill.conditions}: no such file")
        recipe.distill.conditions = str(conditions.resolve())
    _convert(recipe, recipe_path, out_dir, resume)


def _parse_resolutions(values: list[str]) -> list[int]:
    """`--resolution` values ("256", "512,1024") → pixel sizes."""
    pixels = []
    for value in values:
        for part in value.split(","):
            if not part.strip().isdigit() or int(part) <= 0:
                raise InputError(f"--resolution {value}: expected positive pixel sizes, e.g. 256,512,1024")
            pixels.append(int(part))
    return pixels


def _dry_run(recipe, recipe_path: Path, pixels: list[int] | None = None, device=None, processes=None) -> None:
    import yaml

    from dit_graft.families import family_for
    from dit_graft.plan import apply

    t0 = time.perf_counter()
    _, model = _load_teacher(recipe, recipe_path, meta=True)
    graft_plan = _plan_meta(model, recipe)
    student = apply(model, graft_plan)
    scale = family_for(model).vae_scale(model)
    for px in pixels or []:
        if px % scale or (px // scale) % _latent_multiple(model):
            raise InputError(
                f"--resolution {px}: not a size {type(model).__name__} takes "
                f"(a multiple of {scale * _latent_multiple(model)} px)"
            )
    # without --resolution, a family may name the sizes its costs are quoted at (Wan: 480p and 720p × 81 frames)
    named = {} if pixels else family_for(model).cost_sizes(model)
    sizes = [px // scale for px in pixels] if pixels else list(named.values()) or [None]
    costs = [(model_cost(model, size), model_cost(student, size)) for size in sizes]
    labels = [str(px) for px in pixels] or list(named)
    out_console.print("[bold]resolved recipe[/bold]")
    out_console.print(yaml.safe_dump(recipe.model_dump(), sort_keys=False).rstrip())
    if labels:
        out_console.print(f"[bold]per-module costs at {labels[0]}{' px' if pixels else ''}[/bold]")
    _print_plan(graft_plan, *costs[0])
    if labels:
        _print_resolutions(labels, costs)
    from dit_graft.pipeline import trained_parameters

    trained, total = trained_parameters(model, graft_plan, recipe.distill)
    out_console.print(
        f"trained parameters (distill.trainable: {recipe.distill.trainable}): {_fmt(trained)} of {_fmt(total)}"
    )
    _print_memory(_memory(model, graft_plan, recipe, device, processes))
    out_console.print(f"dry run: no weights loaded ({time.perf_counter() - t0:.1f}s)")


def _memory_device(text: str | None) -> tuple[int, str]:
    from dit_graft.memory import device_from

    return device_from(text)


def _memory(model, graft_plan, recipe, device: tuple[int, str] | None, processes: int | None):
    from dit_graft.memory import plan_for, processes_from

    return plan_for(model, graft_plan, recipe, device or _memory_device(None), processes_from(processes))


def _print_memory(plan) -> None:
    """The memory plan per device: one row per part, the total against the device, settings that would fit."""
    from dit_graft.memory import gib

    s = plan.settings
    title = (
        f"memory per device: {s.processes} × {s.parallel}, batch {plan.per_device_batch}/device, "
        f"trainable {s.trainable}, frozen {s.frozen_dtype}, "
        f"checkpointing {'on' if s.gradient_checkpointing else 'off'}, mixed precision {s.mixed_precision}"
    )
    table = Table(title=title)
    table.add_column("part")
    table.add_column("bytes", justify="right")
    for name, n in plan.rows.items():
        table.add_row(name, gib(n))
    table.add_row("[bold]total[/bold]", f"[bold]{gib(plan.total)}[/bold]")
    table.add_row("device", f"{gib(plan.device_bytes)} ({plan.device_name})")
    out_console.print(table)
    verdict = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
    out_console.print(
        f"memory plan: {gib(plan.total)} of {gib(plan.device_bytes)} per device: {verdict}; "
        f"{_fmt(plan.shared_params)} frozen parameters shared with the teacher; "
        f"pool on disk (and in host memory) {gib(plan.pool_disk)}"
    )
    for note in plan.notes:
        out_console.print(f"[yellow]note[/yellow]: {note}")
    for settings, total in plan.suggestions:
        out_console.print(f"  would fit ({gib(total)}): {', '.join(settings.overrides(s))}")


def _latent_multiple(model) -> int:
    """What a latent side must be a multiple of (the family's `latent_multiple`: the patch size, or its packing)."""
    from dit_graft.families import family_for

    return family_for(model).latent_multiple(model)


def _print_resolutions(pixels: list[int | str], costs: list[tuple[dict, dict]]) -> None:
    table = Table(title="cost per image by resolution (teacher → student)")
    for col in ("px", "params", "FLOPs", "ratio", "attention FLOPs", "ratio", "attention share"):
        table.add_column(col, justify="right")
    for px, (before, after) in zip(pixels, costs, strict=True):
        attn_b, attn_a = sum(before["attention_flops"].values()), sum(after["attention_flops"].values())
        table.add_row(
            str(px),
            f"{_fmt(before['params'])} → {_fmt(after['params'])}",
            f"{_fmt(before['flops'])} → {_fmt(after['flops'])}",
            f"{after['flops'] / before['flops']:.3f}" if before["flops"] else "-",
            f"{_fmt(attn_b)} → {_fmt(attn_a)}",
            f"{attn_a / attn_b:.3f}" if attn_b else "-",
            f"{attn_b / before['flops']:.0%} → {attn_a / after['flops']:.0%}" if after["flops"] else "-",
        )
    out_console.print(table)


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console, transient=False)


def _reporter(progress, description: str):
    """A progress callback `(done, total, info=None)`; `info` may be a loss or a string.

    The task appears on the first report, so work that turns out to be cached shows no idle bar.
    """
    task = None

    def report(done, total, info=None):
        nonlocal task
        if task is None:
            task = progress.add_task(description, total=total, info="")
        text = f"loss {info:.4g}" if isinstance(info, float) else (info or "")
        progress.update(task, completed=done, total=total, info=text)

    return report


def _choose_layers(teacher, recipe, work_dir: Path, progress):
    """Resolves `layers: {auto: ...}` on the teacher; returns the explicit recipe and the selections."""
    from dit_graft.pipeline import choose_layers

    return choose_layers(teacher, recipe, work_dir, lambda description: _reporter(progress, description))


def _convert(recipe, recipe_path: Path, out_dir: Path, resume: bool) -> None:
    """Runs `dit_graft.pipeline.convert` with progress bars and notes (main process only)."""
    import contextlib

    from dit_graft.pipeline import convert
    from dit_graft.recipe import recipe_dir
    from dit_graft.training import dist

    main = dist.init().main
    with _progress() if main else contextlib.nullcontext() as progress:
        done = convert(
            recipe,
            out_dir,
            base_dir=recipe_dir(recipe_path),
            resume=resume,
            progress=(lambda description: _reporter(progress, description)) if main else None,
            log=console.print,
        )
    if main:
        out_console.print(f"exported {out_dir} in {done.metrics['seconds']}s (final loss {done.metrics['final_loss']})")
    dist.shutdown()


@app.command("plan")
def plan_(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="A graft recipe (YAML).")],
    set_: Annotated[list[str], typer.Option("--set", help="Override KEY=VALUE (dotted path, list indices).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: runs/plan-<recipe name>).")
    ] = None,
    device_memory: DeviceMemoryOption = None,
    processes: ProcessesOption = None,
) -> None:
    """Resolve a recipe on the real teacher: automatic layers chosen, per-layer sensitivity plotted.

    Writes OUT/recipe.yaml (the recipe with explicit layers, ready for `convert`), OUT/memory.json (the
    memory plan per device, as printed), and for automatic layers OUT/sensitivity.json and
    OUT/sensitivity.png (a bar chart per edit, chosen layers in green).
    """
    import yaml

    from dit_graft.autoselect import plot
    from dit_graft.plan import apply
    from dit_graft.recipe import load_recipe

    recipe = load_recipe(recipe_path, set_ or [])
    device = _memory_device(device_memory)
    out_dir = out or Path("runs") / f"plan-{recipe.name or recipe_path.stem}"
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: exists and is not a directory")
    _, teacher = _load_teacher(recipe, recipe_path, meta=False)
    _check_family(teacher)
    work_dir = out_dir / ".work"
    work_dir.mkdir(parents=True, exist_ok=True)
    with _progress() as progress:
        resolved, selections = _choose_layers(teacher, recipe, work_dir, progress)
    graft_plan = _plan(teacher, resolved)
    _print_plan(graft_plan, model_cost(teacher), model_cost(apply(teacher, graft_plan)))
    memory = _memory(teacher, graft_plan, resolved, device, processes)
    _print_memory(memory)
    files = {
        "recipe.yaml": yaml.safe_dump(resolved.model_dump(), sort_keys=False),
        "memory.json": json.dumps(memory.to_json(), indent=1),
    }
    if selections:
        table = Table(title="per-layer sensitivity (relative output error when grafted alone)")
        for col in ("edit", "layer", "sensitivity", "chosen"):
            table.add_column(col, justify="right")
        for sel in selections:
            for layer, err in sorted(sel.sensitivity.items()):
                table.add_row(f"graft.{sel.edit}", str(layer), f"{err:.4g}", "yes" if layer in sel.chosen else "")
        out_console.print(table)
        record = [
            {
                "edit": s.edit,
                "op": s.op,
                "site": s.site,
                "group": s.group,
                "chosen": s.chosen,
                "sensitivity": s.sensitivity,
            }
            for s in selections
        ]
        files["sensitivity.json"] = json.dumps(record, indent=1)
    for name, text in files.items():
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out_dir / name)
    if selections:
        plot(selections, out_dir / ".sensitivity.tmp.png")
        (out_dir / ".sensitivity.tmp.png").replace(out_dir / "sensitivity.png")
    shutil.rmtree(work_dir, ignore_errors=True)
    out_console.print(f"wrote {', '.join(sorted([*files, *(['sensitivity.png'] if selections else [])]))} to {out_dir}")


@app.command()
def validate(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE")],
    set_: Annotated[list[str], typer.Option("--set", help="Override KEY=VALUE.")] = None,
) -> None:
    """Check a recipe against the model's real modules, loading no weights."""
    from dit_graft.plan import apply
    from dit_graft.recipe import load_recipe

    recipe = load_recipe(recipe_path, set_ or [])
    _, model = _load_teacher(recipe, recipe_path, meta=True)
    graft_plan = _plan_meta(model, recipe)
    apply(model, graft_plan)
    n = sum(len(e.modules) for e in graft_plan.edits)
    out_console.print(f"{recipe_path}: ok — {len(graft_plan.edits)} edit(s), {n} module(s) on {graft_plan.base_class}")


@app.command()
def inspect(
    source: Annotated[
        str,
        typer.Argument(
            metavar="PATH_OR_ID", help="A model/pipeline/export directory, checkpoint, bundled:NAME or hub id."
        ),
    ],
    resolution: Annotated[int | None, typer.Option(help="Input size in the model's sample units.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Blocks, attention kind per site, parameters and FLOPs per image."""
    from dit_graft.export import from_pretrained, read_graft
    from dit_graft.families import family_for
    from dit_graft.loading import load_model, model_dir, resolve_source

    src = resolve_source(source)
    graft = None
    if isinstance(src, Path) and src.is_dir():
        graft = read_graft(model_dir(src))
    model = from_pretrained(src) if graft is not None else load_model(src, meta=True)
    family = family_for(model)
    cost = model_cost(model, resolution)
    ops = graft["operators"] if graft else {}
    sites = []
    for s in family.sites(model):
        if s.kind == "attention":
            sites.append(
                {
                    "path": s.path,
                    "group": getattr(s, "group", None),
                    "layer": s.layer,
                    "operator": ops.get(s.path, "softmax"),
                    "flops": cost["attention_flops"].get(s.path, 0),
                }
            )
    info = {
        "class": type(model).__name__,
        "family": family.name,
        "layers": family.num_layers(model),
        "params": cost["params"],
        "flops_per_image": cost["flops"],
        "attention": sites,
    }
    if as_json:
        print(json.dumps(info))
        return
    table = Table(title=f"{source} — {info['class']} ({family.name}), {info['layers']} blocks")
    for col in ("site", "group", "operator", "FLOPs"):
        table.add_column(col)
    for s in sites:
        table.add_row(s["path"], s["group"] or "", s["operator"], _fmt(s["flops"]))
    out_console.print(table)
    out_console.print(f"parameters {_fmt(info['params'])}, FLOPs per image {_fmt(info['flops_per_image'])}")


@app.command("eval")
def eval_(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL", help="An export, a model or pipeline directory, a DiT checkpoint, bundled:NAME."
        ),
    ],
    teacher: Annotated[str | None, typer.Option(help="Teacher to compare with (same noise, same conditions).")] = None,
    samples: Annotated[int, typer.Option(min=2, help="Samples to generate (spread over classes or captions).")] = 300,
    steps: Annotated[int, typer.Option(min=1, help="Sampler steps.")] = 50,
    cfg: Annotated[float, typer.Option(help="Classifier-free guidance scale (FLUX: unused).")] = 1.5,
    seed: Annotated[int, typer.Option(help="Noise and reference-set seed.")] = 0,
    resolution: Annotated[
        int | None, typer.Option(help="Image size in pixels (latent size × the VAE factor); default: the model's.")
    ] = None,
    conditions: Annotated[
        Path | None, typer.Option(help="Cached caption embeddings (.safetensors) for PixArt/FLUX; default: synthetic.")
    ] = None,
    vae: Annotated[
        Path | None,
        typer.Option(help="VAE to decode latents (a diffusers VAE or pipeline directory); default: MODEL's vae/."),
    ] = None,
    real: Annotated[Path | None, typer.Option(help="Folder of real images (.png/.jpg) for FID.")] = None,
    inception_weights: Annotated[
        Path | None, typer.Option(help="FID Inception-v3 state dict (.pth or .safetensors), for --real.")
    ] = None,
    device: Annotated[str, typer.Option(help="Device to sample on (cpu, cuda, cuda:1).")] = "cpu",
    batch: Annotated[int, typer.Option(min=1, help="Samples per sampler call.")] = 100,
    out: Annotated[Path | None, typer.Option(help="Directory for samples.png, report.md and report.json.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    compile_: Annotated[
        bool,
        typer.Option("--compile", help="torch.compile (fullgraph, inductor) MODEL and --teacher before timing them."),
    ] = False,
) -> None:
    """Sample a model; fidelity and latency against a teacher, digits FD/accuracy, real-dataset FID."""
    from dit_graft.evaluate import FIDReference, evaluate, latent_size, load_vae, sample_grid, vae_dir, write_report
    from dit_graft.metrics import require_fid_inputs

    fid_inputs = require_fid_inputs(real, inception_weights)  # before anything is loaded or sampled
    if conditions is not None and not conditions.is_file():
        raise InputError(f"--conditions {conditions}: no such file")
    student, student_path = _load_eval_model(model, device)
    ref, teacher_path = _load_eval_model(teacher, device) if teacher else (None, None)
    vae_path = vae
    if vae is None and _eval_family(student).vae_scale(student) > 1:  # latents: MODEL's or the teacher's vae/
        vae_path = next((d for d in (student_path, teacher_path) if d is not None and vae_dir(d)), None)
    autoencoder = load_vae(vae_path, device) if vae_path is not None else None
    fid = FIDReference(*fid_inputs, device=device) if fid_inputs is not None else None
    report, s, t = evaluate(
        student,
        ref,
        samples,
        steps,
        cfg,
        seed,
        conditions=conditions,
        resolution=latent_size(student, resolution),
        vae=autoencoder,
        vae_source=str(vae_dir(vae_path)) if autoencoder is not None else None,
        fid=fid,
        batch=batch,
        compile="inductor" if compile_ else None,
    )
    report = {"model": model, "teacher": teacher, **report}
    if out is not None:
        write_report(report, sample_grid(s, t), out)
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title=f"eval {model}")
    table.add_column("metric")
    table.add_column("value")
    for k, v in report.items():
        if k != "notes":
            table.add_row(k, "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
    out_console.print(table)
    for note in report["notes"]:
        out_console.print(f"- {note}")


def _eval_family(model):
    """The model's family adapter; an unsupported class is an InputError."""
    from dit_graft.families import family_for

    try:
        return family_for(model)
    except KeyError as e:
        raise InputError(f"eval: {e.args[0]}") from None


def _load_eval_model(source: str, device: str):
    """Loads MODEL or --teacher: exports and directories through from_pretrained, else the loader; (model, dir)."""
    from dit_graft.export import from_pretrained
    from dit_graft.loading import load_model, resolve_source

    resolved = resolve_source(source)
    if isinstance(resolved, Path) and resolved.is_dir():
        model = from_pretrained(resolved, device)
    else:  # an original DiT checkpoint file or a hub id
        model = load_model(resolved).to(device)
    _eval_family(model)
    return model, resolved if isinstance(resolved, Path) and resolved.is_dir() else None


@app.command()
def operators() -> None:
    """List every operator with its site, a one-line description, its options, what it needs and its FLOPs."""
    from dit_graft.operators import OPERATORS, Site, TokenGrid
    from dit_graft.operators.base import describe_needs

    # DiT-XL/2 at 1024 px: 4096 tokens on a 64x64 grid, C = 1152, 16 heads
    site = Site("attn", "attention", 0, 1152, 16, TokenGrid((64, 64)))
    dense = OPERATORS.get("softmax").flops(site, 4096, OPERATORS.get("softmax").parse_options({}))
    table = Table(
        title="operators",
        caption="† attention-core FLOP formula, default options, ÷ softmax's; DiT-XL/2 at 1024 px "
        "(4096 tokens on a 64×64 grid, C = 1152, 16 heads); projections excluded",
    )
    for col in ("name", "site", "description", "options", "works on", "FLOPs ÷ softmax†"):
        table.add_column(col)
    for name, op in OPERATORS.items():
        opts = ", ".join(f"{k}={f.default!r}" for k, f in op.options.model_fields.items())
        ratio = "-"
        if op.flops is not None:
            ratio = f"{op.flops(site, 4096, op.parse_options({})) / dense:.3g}"
        table.add_row(name, op.site, op.summary, opts, describe_needs(op), ratio)
    out_console.print(table)


@app.command()
def recipes() -> None:
    """List the bundled recipes."""
    from dit_graft.recipe import bundled_recipes

    for path in bundled_recipes():
        out_console.print(f"{path}")


@app.command("lora")
def lora_(
    teacher_lora: Annotated[
        Path, typer.Argument(metavar="TEACHER_LORA", help="A LoRA trained for the teacher (.safetensors).")
    ],
    student: Annotated[Path, typer.Argument(metavar="STUDENT_EXPORT", help="The student's export directory.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the student's LoRA and its report.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Remap a teacher's LoRA onto a student by its plan; report what carried over exactly."""
    from dit_graft.lora import remap_export, write_lora

    if out.resolve() in (student.resolve(), teacher_lora.resolve()):
        raise InputError(f"--out {out}: must differ from the student export and the LoRA file")
    remap, report = remap_export(teacher_lora, student)
    path = write_lora(remap, report, out)
    if as_json:
        print(json.dumps(report))
        return
    out_console.print(
        f"{report['modules_carried']} of {report['lora_modules']} LoRA modules carried over exactly; "
        f"parameters {report['params_carried_exactly']} of {report['params_teacher_lora']} "
        f"({report['params_carried_exactly'] / max(report['params_teacher_lora'], 1):.1%}); "
        f"update norm {report['update_norm_carried']:.4g} of {report['update_norm_teacher']:.4g} "
        f"({report['update_norm_share']:.1%})"
    )
    for where, why in report["dropped"].items():
        out_console.print(f"- dropped {where}: {why}")
    out_console.print(f"wrote {path}")


@app.command("verify")
def verify_(
    export_dir: Annotated[Path, typer.Argument(metavar="OUT", help="An export directory written by dit-graft.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Check an export against the checksums and the seeded forward recorded when it was written (exit 3 if not)."""
    from dit_graft.verify import verify

    report = verify(export_dir)
    problems = report["problems"]
    if as_json:
        print(json.dumps(report))
    elif not problems:
        rel = report.get("forward_relative_error")
        out_console.print(
            f"ok: {export_dir} — {report.get('family')} {report.get('base_class')} converted from "
            f"{report.get('teacher')} by dit-graft {report.get('dit_graft_version')}; {report['files_checked']} files "
            f"match their checksums; the seeded forward matches (relative error {rel:.3g})"
        )
        for name in report["files_added"]:
            out_console.print(f"- not part of the export: {name}")
    if problems:
        if not as_json:
            for p in problems:
                console.print(f"- {p}", highlight=False, soft_wrap=True)
        raise IntegrityError(
            f"{export_dir}: {len(problems)} mismatch(es) with what was recorded at export: {problems[0]}"
        )


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors with distinct exit codes (2 input, 3 integrity, 4 divergence)."""
    try:
        app(args=argv, standalone_mode=False)
    except DitGraftError as e:
        if _state["debug"]:
            raise
        from dit_graft.training import dist

        if dist.ends_together(e):  # several processes: only one of them prints (see dist.ends_together)
            console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        dist.leave(e.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted: rerun with --resume to continue from the last checkpoint")
        sys.exit(130)
    except (typer.Abort, typer.Exit) as e:
        sys.exit(getattr(e, "exit_code", 1))
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
