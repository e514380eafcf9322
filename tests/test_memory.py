"""The memory plan: the estimate against measured peak memory, the knob search, the CLI's --device-memory.

The calibration tests train small DiTs (a few AdamW steps, the way the trainer does it: the teacher's
forward under no_grad, the student's forward and backward, frozen unedited parameters shared with the
teacher, optional per-block checkpointing) in a fresh subprocess and compare its peak RSS, minus its RSS
before any model was built, with the plan's estimate for the same settings (no GPU reserve): within
1.5× either way. The subprocess runs its own minimal training step (`_train_probe`), not the trainer,
so it measures exactly the settings the plan is asked about.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from dit_graft.errors import InputError

# DiT sizes for the calibration: big enough that the measured parts dwarf the allocator's noise
PROBES = {
    # whole student trains, activations kept: weights, gradients, AdamW and activations all count
    "all": dict(
        config=dict(num_attention_heads=4, attention_head_dim=64, num_layers=4, sample_size=32),
        graft={"site": "attention", "layers": "all", "op": "linear", "options": {"feature_map": "relu"}},
        distill=dict(trainable="all", gradient_checkpointing=False, batch_size=8),
    ),
    # only the grafted attention trains, per-block checkpointing, the rest shared with the teacher
    "grafted-checkpointed": dict(
        config=dict(num_attention_heads=8, attention_head_dim=64, num_layers=4, sample_size=16),
        graft={"site": "attention", "layers": "all", "op": "linear", "options": {"feature_map": "relu"}},
        distill=dict(trainable="grafted", gradient_checkpointing=True, batch_size=8),
    ),
    # the whole student, checkpointed: inputs of every block + one block recomputed
    "all-checkpointed": dict(
        config=dict(num_attention_heads=4, attention_head_dim=64, num_layers=6, sample_size=32),
        graft={"site": "mlp", "layers": "0-2", "op": "mlp_ratio", "options": {"ratio": 2.0}},
        distill=dict(trainable="all", gradient_checkpointing=True, batch_size=8),
    ),
    # softmax attention on SDPA's math path: the (B, H, N, N) probabilities are saved for backward
    "softmax-math": dict(
        config=dict(num_attention_heads=4, attention_head_dim=64, num_layers=4, sample_size=64),
        graft={"site": "mlp", "layers": "0", "op": "mlp_ratio", "options": {"ratio": 2.0}},
        distill=dict(trainable="all", gradient_checkpointing=False, batch_size=2),
        attention="math",
    ),
}
BASE_CONFIG = dict(
    in_channels=4, out_channels=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero", dropout=0.0
)


def _recipe(probe: dict):
    from dit_graft.recipe import validate

    return validate(
        {
            "model": {"source": "probe"},
            "graft": [probe["graft"]],
            "distill": {"mixed_precision": "no", **probe["distill"]},
        }
    )


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _train_probe(name: str, steps: int = 2) -> dict:
    """Runs in a fresh process: builds teacher and student, trains `steps` steps, returns peak − baseline RSS."""
    import copy

    import torch
    from diffusers import DiTTransformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.checkpoint import checkpoint

    from dit_graft.families import family_for
    from dit_graft.memory import scope_of, touched_modules
    from dit_graft.pipeline import peak_rss_bytes
    from dit_graft.plan import apply, plan

    torch.manual_seed(0)
    probe = PROBES[name]
    recipe = _recipe(probe)
    cfg = recipe.distill
    baseline = _rss()
    teacher = DiTTransformer2DModel(**BASE_CONFIG, **probe["config"]).eval().requires_grad_(False)
    graft_plan = plan(teacher, recipe)
    base = copy.deepcopy(teacher)
    originals = list(base.named_parameters())
    student = apply(base, graft_plan, inplace=True)
    del base
    teacher_ids = {id(p): (n, tuple(p.shape)) for n, p in originals}
    kinds = scope_of(student, touched_modules(teacher, student, graft_plan), cfg.trainable, teacher_ids)
    by_name = dict(teacher.named_parameters())
    for pname, kind in kinds.items():  # frozen and unedited: the teacher's own tensor, not a copy
        module_path, _, leaf = pname.rpartition(".")
        module = student.get_submodule(module_path)
        if kind == "shared":
            module._parameters[leaf] = by_name[pname]
        else:
            module._parameters[leaf].requires_grad_(kind == "trainable")
    del originals, teacher_ids
    family = family_for(student)
    if cfg.gradient_checkpointing:
        for block in family.blocks(student):
            forward = block.forward
            block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    trainable = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    size = probe["config"]["sample_size"]
    backend = SDPBackend.MATH if probe.get("attention") == "math" else SDPBackend.FLASH_ATTENTION
    for _ in range(steps):
        x = torch.randn(cfg.batch_size, 4, size, size, generator=gen)
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=gen)
        y = {"class_labels": torch.randint(0, 10, (cfg.batch_size,), generator=gen)}
        with torch.no_grad():
            target = family.forward(teacher, x, t, y)
        with sdpa_kernel(backend):
            loss = torch.nn.functional.mse_loss(family.forward(student, x, t, y), target)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = peak_rss_bytes()  # VmHWM: ru_maxrss would carry pytest's own size across fork and exec
    return {"measured": peak - baseline, "baseline": baseline, "trainable": sum(p.numel() for p in trainable)}


def _estimate(name: str) -> dict:
    import torch
    from diffusers import DiTTransformer2DModel

    from dit_graft.memory import plan_memory, profile, settings_from
    from dit_graft.plan import plan

    probe = PROBES[name]
    recipe = _recipe(probe)
    with torch.device("meta"):
        teacher = DiTTransformer2DModel(**BASE_CONFIG, **probe["config"])
    prof = profile(teacher, plan(teacher, recipe), recipe)
    settings = settings_from(recipe, processes=1, attention=probe.get("attention", "flash"), gpu=False)
    result = plan_memory(prof, settings, 10**12, "cpu", pool_size=1)
    return {"estimate": result.total, "rows": result.rows, "trainable": prof.scopes[settings.trainable].trainable}


@pytest.mark.parametrize("name", list(PROBES))
def test_estimate_matches_measured_peak(name):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
    run = subprocess.run(
        [sys.executable, __file__, name], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    est = _estimate(name)
    assert est["trainable"] == measured["trainable"]  # the plan's scope is the one trained
    ratio = est["estimate"] / measured["measured"]
    assert 1 / 1.5 <= ratio <= 1.5, (name, ratio, measured, est)


def test_parse_size():
    from dit_graft.memory import parse_size

    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("141 GB") == 141 * 10**9
    assert parse_size("79.5GiB") == int(79.5 * 2**30)
    assert parse_size("80") == 80 * 10**9
    for bad in ("eighty", "80XB", "-3GB", "0GB", ""):
        with pytest.raises(InputError, match="--device-memory"):
            parse_size(bad)


def test_scopes_order_and_sharing(tiny_dit_dir):
    """new ⊂ grafted ⊂ all; frozen unedited parameters are shared; the search finds settings that fit."""
    import torch

    from dit_graft.loading import load_model
    from dit_graft.memory import estimate, plan_memory, profile, settings_from
    from dit_graft.plan import plan
    from dit_graft.recipe import validate

    recipe = validate(
        {
            "model": {"source": str(tiny_dit_dir)},
            "graft": [{"site": "attention", "layers": "0", "op": "linear", "options": {"dwconv": 3}}],
            "distill": {"batch_size": 4},
        }
    )
    teacher = load_model(tiny_dit_dir, meta=True)
    prof = profile(teacher, plan(teacher, recipe), recipe)
    s = prof.scopes
    assert 0 < s["new"].trainable < s["grafted"].trainable < s["all"].trainable == prof.student_params
    assert s["all"].shared == 0 and s["grafted"].shared == prof.student_params - s["grafted"].trainable
    assert s["lora"].trainable > 0 and s["lora"].shared > 0
    acts = prof.activations
    assert acts["new"].saved(False, False) <= acts["all"].saved(False, False)
    assert acts["all"].saved(True, False) < acts["all"].saved(False, False)
    assert acts["all"].saved(False, True) > acts["all"].saved(False, False)  # the math path keeps the scores
    base = settings_from(recipe)
    rows = estimate(prof, base)
    assert rows["optimizer state (AdamW)"] == 2 * rows["gradients"] == 8 * prof.student_params
    # too small a device: not fitting, with suggestions that do fit and are cheaper than the base
    need = sum(rows.values())
    result = plan_memory(prof, base, need - 1, "small", pool_size=8)
    assert not result.fits and result.suggestions
    assert all(total <= need - 1 for _, total in result.suggestions)
    assert plan_memory(prof, base, need, "exact", pool_size=8).fits
    fsdp = estimate(prof, replace(base, parallel="fsdp", processes=4))
    assert fsdp["optimizer state (AdamW)"] == rows["optimizer state (AdamW)"] // 4
    assert fsdp["teacher weights"] == rows["teacher weights"]  # a full teacher copy on every device
    bf16 = estimate(prof, replace(base, frozen_dtype="bfloat16"))  # no mixed precision: autocast in bf16
    assert bf16["activations"] == rows["activations"] // 2 and bf16["teacher weights"] == rows["teacher weights"] // 2
    ddp = estimate(prof, replace(base, processes=4, batch_size=4))  # one sample per device
    assert ddp["activations"] == rows["activations"] // 4 and "gradient all-reduce buffer (beyond activations)" in ddp
    assert torch.device("meta") == next(teacher.parameters()).device  # nothing was materialised


@pytest.mark.parametrize("scope", ["new", "grafted", "all", "lora"])
def test_scopes_match_the_trainer(tiny_dit_dir, scope):
    """The plan counts the parameters the trainer trains and shares (dit_graft.training.scope)."""
    from dit_graft.loading import load_model
    from dit_graft.memory import profile
    from dit_graft.plan import apply, plan
    from dit_graft.recipe import validate
    from dit_graft.training.scope import select, share_frozen
    from dit_graft.training.stages import targets

    recipe = validate(
        {
            "model": {"source": str(tiny_dit_dir)},
            "graft": [
                {"site": "attention", "layers": "0", "op": "linear", "options": {"dwconv": 3}},
                {"site": "mlp", "layers": "1", "op": "mlp_ratio", "options": {"ratio": 2.0}},
            ],
            "distill": {"trainable": scope, "lora": {"rank": 4}},
        }
    )
    teacher = load_model(tiny_dit_dir).requires_grad_(False)
    graft_plan = plan(teacher, recipe)
    student = apply(teacher, graft_plan)
    chosen = select(teacher, student, targets(teacher, student, graft_plan), recipe.distill)
    shared = share_frozen(teacher, student)
    prof = profile(load_model(tiny_dit_dir, meta=True), graft_plan, recipe)
    assert prof.scopes[scope].trainable == chosen.count
    assert prof.scopes[scope].shared == shared


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from dit_graft.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_prints_the_memory_plan(tmp_path, tiny_dit_dir, write_recipe, capsys):
    from tests.conftest import tiny_recipe

    recipe = str(write_recipe(tiny_recipe(tiny_dit_dir, tmp_path / "out")))
    code, out, err = _cli(["convert", recipe, "--dry-run", "--device-memory", "80GB", "--processes", "2"], capsys)
    assert code == 0, err
    assert "memory per device: 2 × ddp" in out and "optimizer state (AdamW)" in out and "fits" in out
    code, out, _ = _cli(["convert", recipe, "--dry-run", "--device-memory", "1MB"], capsys)
    assert code == 0 and "does not fit" in out  # not even the CUDA reserve: nothing to suggest


@pytest.mark.parametrize("value", ["80XB", "lots", "-80GB", "0"])
def test_malformed_device_memory_is_one_line_exit_2(tmp_path, tiny_dit_dir, write_recipe, capsys, value):
    from tests.conftest import tiny_recipe

    recipe = str(write_recipe(tiny_recipe(tiny_dit_dir, tmp_path / "out")))
    code, _, err = _cli(["convert", recipe, "--dry-run", f"--device-memory={value}"], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "--device-memory" in err and "Traceback" not in err


def test_device_memory_without_dry_run_is_refused(tmp_path, tiny_dit_dir, write_recipe, capsys):
    from tests.conftest import tiny_recipe

    recipe = str(write_recipe(tiny_recipe(tiny_dit_dir, tmp_path / "out")))
    code, _, err = _cli(["convert", recipe, "--device-memory", "80GB"], capsys)
    assert code == 2 and "only with --dry-run" in err and not (tmp_path / "out").exists()


def test_plan_writes_memory_json(tmp_path, tiny_dit_dir, write_recipe, capsys):
    from tests.conftest import tiny_recipe

    recipe = str(write_recipe(tiny_recipe(tiny_dit_dir, tmp_path / "out")))
    code, out, err = _cli(["plan", recipe, "--out", str(tmp_path / "plan"), "--device-memory", "141GB"], capsys)
    assert code == 0, err
    memory = json.loads((tmp_path / "plan" / "memory.json").read_text())
    assert memory["device_bytes"] == 141 * 10**9 and memory["fits"] is True
    assert memory["total_bytes"] == sum(memory["bytes"].values()) and memory["bytes"]["activations"] > 0


if __name__ == "__main__":
    print(json.dumps(_train_probe(sys.argv[1])))
