"""`dit-graft lora`: a teacher LoRA remapped onto students of every family equals the merged teacher's student."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dit_graft.export import export
from dit_graft.families import family_for
from dit_graft.lora import LORA_NAME, load_lora, read_lora_file, remap_export, write_lora
from dit_graft.plan import GraftPlan, apply, plan
from dit_graft.recipe import validate
from tests.conftest import tiny_dit
from tests.test_cli import run_cli
from tests.test_families import tiny_flux, tiny_pixart

DISTILL = {"steps": 1, "batch_size": 2, "pool_size": 2, "pool_steps": 2, "warmup": 1}


def _recipe(graft: list[dict]):
    return validate({"model": {"source": "unused"}, "graft": graft, "distill": DISTILL})


def _linear_paths(model, words: tuple[str, ...]) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n.endswith(w) for w in words) and "processor" not in n
    ]


def make_lora(model, paths: list[str], rank: int = 3, seed: int = 0, alpha: float | None = None) -> dict:
    """A random teacher LoRA in diffusers' layout (B non-zero, unlike a fresh peft init)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path in paths:
        mod = model.get_submodule(path)
        state[f"transformer.{path}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.2
        state[f"transformer.{path}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.2
        if alpha is not None:
            state[f"transformer.{path}.alpha"] = torch.tensor(alpha)
    return state


def merged(model, state: dict, scale: float = 1.0):
    """The teacher with its LoRA merged into the weights."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for key, a in state.items():
            if key.endswith(".lora_A.weight"):
                path = key[len("transformer.") : -len(".lora_A.weight")]
                b = state[key.replace("lora_A", "lora_B")]
                out.get_submodule(path).weight += scale * (b @ a)
    return out


def _export(teacher, graft: list[dict], out: Path):
    recipe = _recipe(graft)
    graft_plan = plan(teacher, recipe)
    student = apply(teacher, graft_plan)
    export(student, graft_plan, recipe.model_dump(), out)
    return student


def _remap(lora_file: Path, export_dir: Path, out: Path) -> dict:
    remap, report = remap_export(lora_file, export_dir)
    write_lora(remap, report, out)
    return report


def _reference(teacher, state, export_dir: Path, scale: float = 1.0):
    """The student the export's plan builds from the teacher with the LoRA merged."""
    graft = json.loads((export_dir / "graft.json").read_text())
    return apply(merged(teacher, state, scale), GraftPlan.model_validate(graft["plan"]))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _forward(model, seed: int = 3):
    inputs = family_for(model).example_inputs(model, 2, None, "cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return out


DIT_GRAFT = [
    {"site": "depth", "op": "prune_depth", "options": {"keep": 3}},
    {"site": "attention", "layers": [0], "op": "linear", "options": {"dwconv": 3}},
    {"site": "mlp", "layers": [1], "op": "prune_width", "options": {"keep": 0.5}},
    {
        "site": "mlp",
        "layers": [2],
        "op": "moe",
        "options": {"experts": 2, "top_k": 2, "shared": 1, "router_init": "zero"},
    },
    {"site": "mlp", "layers": [0], "op": "mlp_ratio", "options": {"ratio": 6}},
]


def test_plan_records_kept_units_and_replays_them():
    teacher = tiny_dit(num_layers=4)
    recipe = _recipe(DIT_GRAFT[2:4])
    graft_plan = plan(teacher, recipe)
    student = apply(teacher, graft_plan)
    units = {m.path: m.units for e in graft_plan.edits for m in e.modules}
    assert len(units["transformer_blocks.1.ff"]["hidden"]) == teacher.transformer_blocks[1].ff.net[2].in_features // 2
    assert set(units["transformer_blocks.2.ff"]) == {"shared", "experts.0", "experts.1"}
    # the same plan on other weights (ranked differently) keeps the recorded units, so the weights are sliced alike
    other = tiny_dit(seed=5, num_layers=4)
    replay = apply(other, GraftPlan.model_validate(graft_plan.model_dump()))
    kept = torch.tensor(units["transformer_blocks.1.ff"]["hidden"])
    assert torch.equal(
        replay.transformer_blocks[1].ff.net[0].proj.weight, other.transformer_blocks[1].ff.net[0].proj.weight[kept]
    )
    assert (
        student.transformer_blocks[1].ff.net[0].proj.weight.shape
        == replay.transformer_blocks[1].ff.net[0].proj.weight.shape
    )


def test_dit_lora_remapped_equals_merged_student(tmp_path):
    teacher = tiny_dit(num_layers=4)
    export_dir = tmp_path / "student"
    student = _export(teacher, DIT_GRAFT, export_dir)
    paths = _linear_paths(teacher, ("to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"))
    state = make_lora(teacher, paths, alpha=6.0)  # rank 3, alpha 6: scale 2
    save_file(state, str(tmp_path / "teacher_lora.safetensors"))
    report = _remap(tmp_path / "teacher_lora.safetensors", export_dir, tmp_path / "lora")
    # the dropped block's modules are reported, every other target is inherited or sliced
    dropped_block = next(
        i for i in range(4) if not any(p.startswith(f"transformer_blocks.{i}.") for p in report["placed"])
    )
    assert report["dropped"] and all(k.startswith(f"transformer_blocks.{dropped_block}.") for k in report["dropped"])
    assert all("dropped transformer_blocks" in v for v in report["dropped"].values())
    assert 0 < report["update_norm_share"] < 1 and report["params_carried_exactly"] < report["params_teacher_lora"]
    with_lora = load_lora(copy.deepcopy(student), tmp_path / "lora")
    ref = _reference(teacher, state, export_dir, scale=2.0)
    assert _rel(_forward(with_lora), _forward(ref)) <= 1e-6
    assert _rel(_forward(student), _forward(ref)) > 1e-3  # the LoRA matters


def test_full_carry_over_reports_everything(tmp_path):
    teacher = tiny_dit()
    export_dir = tmp_path / "student"
    _export(teacher, [{"site": "mlp", "op": "moe", "options": {"experts": 2, "top_k": 1}}], export_dir)
    state = make_lora(teacher, _linear_paths(teacher, ("to_q", "net.0.proj", "net.2")))
    save_file(state, str(tmp_path / "l.safetensors"))
    report = _remap(tmp_path / "l.safetensors", export_dir, tmp_path / "lora")
    assert report["dropped"] == {}
    assert report["params_carried_exactly"] == report["params_teacher_lora"]
    assert report["update_norm_share"] == pytest.approx(1.0)
    keys, _ = read_lora_file(tmp_path / "lora" / LORA_NAME)
    assert "transformer.transformer_blocks.0.ff.experts.1.fc2.lora_A.weight" in keys
    # a LoRA with output biases (peft's lora_bias): the experts' fc2 have none, which is reported
    path = "transformer.transformer_blocks.0.ff.net.2"
    state[f"{path}.lora_B.bias"] = torch.ones(teacher.transformer_blocks[0].ff.net[2].out_features)
    save_file(state, str(tmp_path / "b.safetensors"))
    report = _remap(tmp_path / "b.safetensors", export_dir, tmp_path / "lora_b")
    assert list(report["dropped"]) == ["transformer_blocks.0.ff.net.2.lora_B.bias"]
    assert (
        report["params_carried_exactly"]
        == report["params_teacher_lora"] - teacher.transformer_blocks[0].ff.net[2].out_features
    )


def test_pixart_lora_remapped_equals_merged_student(tmp_path):
    teacher = tiny_pixart()
    export_dir = tmp_path / "student"
    graft = [
        {"site": "attention", "op": "linear", "options": {"dwconv": 3}},
        {"site": "mlp", "layers": [0], "op": "prune_width", "options": {"keep": 0.75, "importance": "taylor"}},
        {"site": "mlp", "layers": [1], "op": "conv_mlp"},
    ]
    student = _export(teacher, graft, export_dir)
    paths = _linear_paths(teacher, ("attn1.to_q", "attn2.to_k", "attn2.to_out.0", "net.0.proj", "net.2"))
    state = make_lora(teacher, paths)
    save_file(state, str(tmp_path / "l.safetensors"))
    report = _remap(tmp_path / "l.safetensors", export_dir, tmp_path / "lora")
    assert report["dropped"] == {}
    assert "transformer_blocks.1.ff.fc1" in report["placed"]["transformer_blocks.1.ff.net.0.proj"]
    with_lora = load_lora(copy.deepcopy(student), tmp_path / "lora")
    ref = _reference(teacher, state, export_dir)
    assert _rel(_forward(with_lora), _forward(ref)) <= 1e-6
    assert _rel(_forward(student), _forward(ref)) > 1e-3


def _flux_pipeline(transformer):
    from diffusers import FluxPipeline

    return FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def test_flux_lora_loads_with_the_pipeline_and_equals_merged_student(tmp_path):
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    teacher = tiny_flux(num_single_layers=3)
    export_dir = tmp_path / "student"
    graft = [
        {"site": "depth", "group": "single", "op": "prune_depth", "options": {"keep": 2}},
        {"site": "attention", "group": "double", "op": "linear", "options": {"dwconv": 0}},
        {"site": "mlp", "group": "double", "op": "prune_width", "options": {"keep": 0.5}},
    ]
    student = _export(teacher, graft, export_dir)
    # a LoRA as diffusers' trainers write it: peft adapter, alpha ≠ r, save_lora_weights with metadata
    lora_teacher = copy.deepcopy(teacher)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "proj_out", "net.0.proj", "net.2"]
    config = LoraConfig(r=4, lora_alpha=2, target_modules=targets, init_lora_weights=False)
    lora_teacher.add_adapter(config)
    layers = get_peft_model_state_dict(lora_teacher)
    FluxPipeline.save_lora_weights(
        tmp_path / "teacher_lora", transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict()
    )
    lora_file = tmp_path / "teacher_lora" / LORA_NAME
    report = _remap(lora_file, export_dir, tmp_path / "lora")
    assert report["dropped"] and all(k.startswith("single_transformer_blocks.") for k in report["dropped"])
    state = {f"transformer.{k}": v for k, v in layers.items()}
    ref = _reference(teacher, state, export_dir, scale=0.5)
    pipe = _flux_pipeline(copy.deepcopy(student))
    pipe.load_lora_weights(tmp_path / "lora")
    assert _rel(_forward(pipe.transformer), _forward(ref)) <= 1e-6
    assert _rel(_forward(student), _forward(ref)) > 1e-3


def test_flux_kohya_layout(tmp_path):
    teacher = tiny_flux()
    export_dir = tmp_path / "student"
    student = _export(
        teacher, [{"site": "mlp", "group": "double", "op": "prune_width", "options": {"keep": 0.5}}], export_dir
    )
    g = torch.Generator().manual_seed(0)
    r, dim = 4, teacher.inner_dim
    kohya, state = {}, {}
    block = "transformer.transformer_blocks.0"
    for name, path, out_f, in_f in [
        ("double_blocks_0_img_attn_proj", f"{block}.attn.to_out.0", dim, dim),
        ("double_blocks_0_img_mlp_0", f"{block}.ff.net.0.proj", 4 * dim, dim),
        ("double_blocks_0_img_mlp_2", f"{block}.ff.net.2", dim, 4 * dim),
        ("single_blocks_1_linear2", "transformer.single_transformer_blocks.1.proj_out", dim, 5 * dim),
    ]:
        a, b = torch.randn(r, in_f, generator=g) * 0.2, torch.randn(out_f, r, generator=g) * 0.2
        kohya |= {f"lora_unet_{name}.lora_down.weight": a, f"lora_unet_{name}.lora_up.weight": b}
        kohya[f"lora_unet_{name}.alpha"] = torch.tensor(8.0)  # scale 2
        state |= {f"{path}.lora_A.weight": a, f"{path}.lora_B.weight": b}
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    report = _remap(tmp_path / "kohya.safetensors", export_dir, tmp_path / "lora")
    assert report["source_format"].startswith("kohya") and report["dropped"] == {}
    pipe = _flux_pipeline(copy.deepcopy(student))
    pipe.load_lora_weights(tmp_path / "lora")
    assert _rel(_forward(pipe.transformer), _forward(_reference(teacher, state, export_dir, scale=2.0))) <= 1e-6


def test_wan_lora_loads_with_the_pipeline_and_equals_merged_student(tmp_path):
    from diffusers import WanPipeline

    from dit_graft.families import FAMILIES
    from tests.contract import tiny_model

    family = FAMILIES.get("wan")
    teacher = tiny_model("wan")
    export_dir = tmp_path / "student"
    graft = [
        {"site": "depth", "op": "prune_depth", "options": {"keep": 1}},
        {"site": "mlp", "op": "prune_width", "options": {"keep": 0.5}},
    ]
    student = _export(teacher, graft, export_dir)
    paths = _linear_paths(teacher, ("to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"))
    state = make_lora(teacher, paths)
    save_file(state, str(tmp_path / "l.safetensors"))
    report = _remap(tmp_path / "l.safetensors", export_dir, tmp_path / "lora")
    assert report["dropped"] and all(k.startswith("blocks.") for k in report["dropped"])
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=copy.deepcopy(student))
    pipe.load_lora_weights(tmp_path / "lora")
    ref = _reference(teacher, state, export_dir)
    inputs = family.tiny_inputs(teacher)

    def run(model):
        with torch.no_grad():
            return family.forward(model, inputs["x"], inputs["t"], inputs["cond"])

    assert _rel(run(pipe.transformer), run(ref)) <= 1e-6
    assert _rel(run(student), run(ref)) > 1e-3


@pytest.fixture(scope="module")
def dit_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "student"
    _export(tiny_dit(), [{"site": "attention", "op": "linear"}], out)
    return out


def _bad(tmp_path, capsys, dit_export, state=None, raw: bytes | None = None, metadata=None):
    path = tmp_path / "bad.safetensors"
    if raw is not None:
        path.write_bytes(raw)
    else:
        save_file(state, str(path), metadata=metadata)
    return run_cli(["lora", path, dit_export, "--out", tmp_path / "out"], capsys)


def test_bad_loras_fail_with_one_line(tmp_path, capsys, dit_export):
    teacher = tiny_dit()
    good = make_lora(teacher, ["transformer_blocks.0.attn1.to_q"])
    cases = {
        "another architecture": (
            {
                "transformer.down_blocks.0.proj.lora_A.weight": torch.ones(2, 4),
                "transformer.down_blocks.0.proj.lora_B.weight": torch.ones(4, 2),
            },
            2,
        ),
        "matches no module": (
            {
                **good,
                "transformer.transformer_blocks.9.attn1.to_q.lora_A.weight": torch.ones(3, 16),
                "transformer.transformer_blocks.9.attn1.to_q.lora_B.weight": torch.ones(16, 3),
            },
            2,
        ),
        "rank mismatch": ({k: (v[:2] if "lora_A" in k else v) for k, v in good.items()}, 3),
        "another model size": ({k: torch.ones(v.shape[0], 32) if "lora_A" in k else v for k, v in good.items()}, 2),
        "kohya-style keys": ({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, 2),
    }
    for needle, (state, code) in cases.items():
        got, _, err = _bad(tmp_path, capsys, dit_export, state)
        assert got == code and needle in err and "Traceback" not in err, (needle, err)
    pickled = pickle.dumps({"transformer.x.lora_A.weight": torch.ones(1)})
    got, _, err = _bad(tmp_path, capsys, dit_export, raw=pickled)
    assert got == 3 and "pickle" in err
    got, _, err = _bad(tmp_path, capsys, dit_export, raw=b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    assert got == 3 and "not a readable safetensors file" in err
    assert not (tmp_path / "out").exists()


def test_cli_lora_writes_a_report(tmp_path, capsys, dit_export):
    state = make_lora(tiny_dit(), ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2"])
    save_file(state, str(tmp_path / "l.safetensors"))
    code, out, err = run_cli(["lora", tmp_path / "l.safetensors", dit_export, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert "2 of 2 LoRA modules carried over exactly" in out and "(100.0%)" in out
    report = json.loads((tmp_path / "o" / "lora_report.json").read_text())
    assert report["teacher"] == "unused" and report["dropped"] == {}
