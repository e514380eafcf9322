"""Exports load with stock diffusers where dit_graft cannot be imported (dit_graft.standalone).

One export per registered operator (attention, MLP and depth), each on the first family of the registry whose tiny
model takes it, plus an original-DiT export (a runtime option diffusers' config cannot hold). A single subprocess,
run outside the repository with `import dit_graft` blocked, loads them all with
`diffusers.AutoModel.from_pretrained(out, trust_remote_code=True)` and runs the seeded forward recorded at export
time; its output must be bitwise the output of `dit_graft.from_pretrained` (recorded in verify.safetensors), and
its modules the same classes.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import os
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dit_graft
from dit_graft import standalone
from dit_graft.errors import RecipeError
from dit_graft.export import export
from dit_graft.families import FAMILIES
from dit_graft.families.dit import use_original_timestep_frequencies
from dit_graft.operators import OPERATORS
from dit_graft.plan import apply, plan
from dit_graft.recipe import validate
from tests.contract import groups_with, tiny_model
from tests.test_extending import TOY

CALIBRATION = {"calibration_resolution": 64, "calibration_samples": 2}  # depth edits score blocks on 8×8 latents

CHILD = r"""
import importlib.abc, json, sys

class BlockDitGraft(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "dit_graft" or name.startswith("dit_graft."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

import torch
from diffusers import AutoModel

if sys.argv[3] == "auto":
    sys.meta_path.insert(0, BlockDitGraft())
    try:
        import dit_graft  # noqa: F401
        raise SystemExit("dit_graft is importable in the child")
    except ModuleNotFoundError:
        pass
    load = lambda directory, **kw: AutoModel.from_pretrained(directory, trust_remote_code=True, **kw)
else:
    import dit_graft

    load = lambda directory, **kw: dit_graft.from_pretrained(directory)
from safetensors.torch import load_file, save_file

def unflatten(layout, tensors, prefix=""):
    out = {}
    for k, v in layout.items():
        if v == "tensor":
            out[k] = tensors[f"input.{prefix}{k}"]
        elif isinstance(v, dict) and set(v) == {"value"}:
            out[k] = v["value"]
        else:
            out[k] = unflatten(v, tensors, f"{prefix}{k}.")
    return out

report = {}
for name, directory in json.loads(sys.argv[1]).items():
    model = load(directory)
    graft = json.load(open(f"{directory}/graft.json"))
    inputs = unflatten(graft["verify"]["inputs"], load_file(f"{directory}/verify.safetensors"))
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0].float()
    save_file({"output": out.contiguous()}, f"{sys.argv[2]}/{name}.safetensors")
    report[name] = {"modules": {k: type(m).__name__ for k, m in model.named_modules()},
                    "training": model.training, "class": type(model).__name__}
if sys.argv[3] == "auto":
    half = load(directory, torch_dtype=torch.bfloat16)
    report["_bfloat16"] = sorted({str(p.dtype) for p in half.parameters()})
report["_kernel_modules"] = sorted(m.split(".", 1)[1] for m in sys.modules if "kernels." in m and "triton" in m)
report["_dit_graft_modules"] = sorted(m for m in sys.modules if m == "dit_graft" or m.startswith("dit_graft."))
print(json.dumps(report))
"""


def _edit(op_name: str, group: str | None, options: dict) -> dict:
    op = OPERATORS.get(op_name)
    if op.structure is not None:
        fields = op.options.model_fields  # a depth case may leave out how many blocks to keep: keep one
        extra = {k: v for k, v in {"keep": 1, **CALIBRATION}.items() if k in fields and k not in options}
        return {"site": "depth", "op": op_name, "options": {**options, **extra}}
    return {"site": op.site, "group": group, "layers": "all", "op": op_name, "options": options}


def _first_student(op_name: str, families: list[str] | None = None):
    """The first (family, group, case) in registry order that plans: its family, plan and student."""
    op = OPERATORS.get(op_name)
    for family_name in families or list(FAMILIES):
        family = FAMILIES.get(family_name)
        teacher = tiny_model(family_name)
        groups = [None] if op.structure is not None else groups_with(family_name, op.site)
        for group in groups:
            for case in op.cases:
                if not case.applies(family_name, group or family.groups[0]):
                    continue
                recipe = validate({"model": {"source": "tiny"}, "graft": [_edit(op_name, group, case.options)]})
                try:
                    graft_plan = plan(teacher, recipe)
                except RecipeError:
                    continue
                return family_name, graft_plan, apply(teacher, graft_plan)
    raise AssertionError(f"no tiny family takes operator {op_name!r}")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("standalone")
    out = {}
    for op_name, _ in OPERATORS.items():
        family_name, graft_plan, student = _first_student(op_name)
        out[f"{family_name}-{op_name}"] = export(student, graft_plan, {"model": {"source": "tiny"}}, root / op_name)
    for family_name, _ in FAMILIES.items():  # every family's attention adapter, with LiT's linear core
        if f"{family_name}-linear" not in out:
            _, graft_plan, student = _first_student("linear", [family_name])
            out[f"{family_name}-linear"] = export(student, graft_plan, {}, root / f"{family_name}-linear")
    # original DiT: its timestep frequencies are a runtime option re-applied from graft.json
    teacher = use_original_timestep_frequencies(copy.deepcopy(tiny_model("dit")))
    recipe = validate({"model": {"source": "tiny"}, "graft": [_edit("linear", None, {})]})
    graft_plan = plan(teacher, recipe)
    assert graft_plan.runtime, "the original-DiT option is not recorded"
    out["dit-original-linear"] = export(apply(teacher, graft_plan), graft_plan, {}, root / "original")
    return out


def _run_child(exports: dict[str, Path], tmp_path: Path, loader: str = "auto", **env_vars: str) -> dict:
    results = tmp_path / f"results-{loader}"
    results.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env_vars)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps({k: str(v) for k, v in exports.items()}), str(results), loader],
        cwd=tmp_path,  # outside the repository: no dit_graft on sys.path[0]
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_operator_loads_bitwise_without_dit_graft(exports, tmp_path):
    assert {k.split("-", 1)[1] for k in exports} >= set(OPERATORS)  # generated from the registry
    report = _run_child(exports, tmp_path)
    assert report.pop("_dit_graft_modules") == []
    assert report.pop("_bfloat16") == ["torch.bfloat16"]  # torch_dtype is honoured
    assert {name.split("-")[0] for name in exports} == set(FAMILIES)
    for name, directory in exports.items():
        expected = load_file(str(directory / "verify.safetensors"))["output"]  # dit_graft.from_pretrained's output
        got = load_file(str(tmp_path / "results-auto" / f"{name}.safetensors"))["output"]
        assert torch.equal(got, expected), f"{name}: output differs from dit_graft.from_pretrained"
        reference = dit_graft.from_pretrained(directory)
        assert report[name]["modules"] == {k: type(m).__name__ for k, m in reference.named_modules()}, name
        assert report[name]["class"] == type(reference).__name__ and report[name]["training"] is False


def test_the_export_carries_the_modeling_file_and_auto_map(exports):
    directory = exports["dit-linear"]
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "modeling_dit_graft.DitGraftStudent"}
    namespace = runpy.run_path(str(directory / standalone.MODULE_FILE))
    assert namespace["PACKAGE"] == standalone.private_name(standalone.runtime_sources())
    sources = {key: source for key, (_, source) in namespace["_SOURCES"].items()}
    sources["(file)"] = (directory / standalone.MODULE_FILE).read_text()
    for key, source in sources.items():  # no import of an installed dit_graft anywhere
        for node in ast.walk(ast.parse(source)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not [n for n in names if n.split(".")[0] == "dit_graft"], (key, node.lineno)
    assert "AutoModel.from_pretrained(path, trust_remote_code=True)" in (directory / "README.md").read_text()
    # dit_graft itself still loads it, without diffusers' warning about an unexpected config key
    assert type(dit_graft.from_pretrained(directory)).__name__ == config["_class_name"]


def test_the_embedded_sources_are_dit_graft_s_own():
    """One source of truth: every embedded module is the installed module's file, renamed in its imports only."""
    sources = standalone.runtime_sources()
    assert {"", "plan", "export", "kernels", "kernels.sla.blockwise", "operators.linear"} <= set(sources)
    assert not any(k.startswith(("cli", "training", "pipeline")) for k in sources)  # the loader's closure only
    package = standalone.private_name(sources)
    renamed = standalone.rename(sources["plan"][1], package, "plan")
    assert renamed.replace(package, "dit_graft") == sources["plan"][1]
    with pytest.raises(RuntimeError, match="was not renamed"):
        standalone.rename("import os, dit_graft\n", package, "x")


def test_the_embedded_triton_kernels_run_as_dit_graft_s(exports, tmp_path):
    """With Triton forced (its CPU interpreter here; CUDA on a GPU), the embedded kernels give dit_graft's output."""
    env = {"TRITON_INTERPRET": "1", "DIT_GRAFT_KERNELS": "triton"}
    standalone_run = _run_child(exports, tmp_path, "auto", **env)
    installed_run = _run_child(exports, tmp_path, "dit_graft", **env)
    assert standalone_run["_kernel_modules"] and standalone_run["_kernel_modules"] == installed_run["_kernel_modules"]
    for name in exports:
        got = load_file(str(tmp_path / "results-auto" / f"{name}.safetensors"))["output"]
        expected = load_file(str(tmp_path / "results-dit_graft" / f"{name}.safetensors"))["output"]
        assert torch.equal(got, expected), f"{name}: the embedded Triton path differs from dit_graft's"


def test_an_operator_registered_outside_dit_graft_is_embedded_too(tmp_path):
    """docs/extending.md's toy operator, from a temporary module: its module rides along in the modeling file."""
    path = tmp_path / "toy_operator_standalone.py"
    path.write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy_operator_standalone", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_operator_standalone"] = module
    try:
        spec.loader.exec_module(module)
        family_name, graft_plan, student = _first_student("toy_uniform")
        out = export(student, graft_plan, {}, tmp_path / "toy")
    finally:
        OPERATORS.unregister("toy_uniform")
        sys.modules.pop("toy_operator_standalone", None)
    path.unlink()  # the child cannot find the module on disk either
    report = _run_child({f"{family_name}-toy_uniform": out}, tmp_path)
    got = load_file(str(tmp_path / "results-auto" / f"{family_name}-toy_uniform.safetensors"))["output"]
    assert torch.equal(got, load_file(str(out / "verify.safetensors"))["output"])
    assert report.pop("_dit_graft_modules") == []


def test_an_operator_without_a_source_file_exports_for_dit_graft_only(tmp_path):
    """Registered from a notebook cell (no file to embed): the export still succeeds, without the modeling file."""
    module = types.ModuleType("toy_operator_cell")
    sys.modules["toy_operator_cell"] = module
    try:
        exec(compile(TOY, "<cell>", "exec"), module.__dict__)
        _, graft_plan, student = _first_student("toy_uniform", ["dit"])
        with pytest.warns(UserWarning, match="no modeling_dit_graft.py .*toy_operator_cell"):
            out = export(student, graft_plan, {}, tmp_path / "toy")
        assert not (out / standalone.MODULE_FILE).exists()
        assert "auto_map" not in json.loads((out / "config.json").read_text())
        assert type(dit_graft.from_pretrained(out)).__name__ == graft_plan.base_class  # dit-graft still loads it
    finally:
        OPERATORS.unregister("toy_uniform")
        sys.modules.pop("toy_operator_cell", None)


def test_a_hub_id_goes_through_huggingface_hub_and_unknown_arguments_are_refused(exports, monkeypatch):
    """The hub branch (no network here: snapshot_download answers with the local export) and the argument check."""
    import huggingface_hub

    directory = exports["dit-linear"]
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(directory.parent)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loader = runpy.run_path(str(directory / standalone.MODULE_FILE))["DitGraftStudent"]
    model = loader.from_pretrained("someone/student", subfolder=directory.name, revision="main", token=None)
    assert calls == [("someone/student", {"allow_patterns": [f"{directory.name}/*"], "revision": "main"})]
    assert torch.equal(model.pos_embed.proj.weight, dit_graft.from_pretrained(directory).pos_embed.proj.weight)
    with pytest.raises(TypeError, match="unsupported argument\\(s\\) low_cpu_mem_usage"):
        loader.from_pretrained(directory, low_cpu_mem_usage=False)
