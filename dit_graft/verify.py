"""`dit-graft verify`: an export checked against what was recorded when it was written.

At export time (`record`, called by `dit_graft.export.export` on the finished temporary directory):

    verify.safetensors   the inputs of one seeded forward (the family's example inputs at a small latent
                         size, hidden states and text drawn from a seeded generator) and the output the
                         export, reloaded by `from_pretrained` on the CPU, gives for them
    graft.json           "verify": the seed, the latent size, the input layout, the device and dtype
    integrity.json       sha256 and size of every other file of the export (graft.json included)

`verify(path)` reloads the export and reports every mismatch: a missing, truncated or edited file
(sizes and hashes), a graft.json written by a newer dit-graft or whose plan does not validate, a config
whose class is not the plan's, weights that do not fit the plan (a strict reload: every key, every
shape), and a seeded forward that no longer gives the recorded output. It names the teacher the export
came from. Files added after the export are listed but are not a mismatch.

The forward runs on the CPU in the export's dtype; reruns on the same machine are bitwise, so the
tolerance (relative error 1e-5 for float32, 2e-2 for 16-bit exports) only absorbs other CPUs' kernels.
Reloading costs a second copy of the model in host memory at export time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from dit_graft import __version__
from dit_graft.errors import IntegrityError
from dit_graft.integrity import (  # noqa: F401  (re-exported: the names verify's users read)
    INTEGRITY_NAME,
    TOLERANCE,
    VERIFY_NAME,
    _files,
    _forward,
    _unflatten,
    sha256,
)


def _version(v: str) -> tuple:
    from packaging.version import InvalidVersion, Version

    try:
        return (Version(v),)
    except InvalidVersion:
        return ()


def verify(path: str | Path) -> dict[str, Any]:
    """Checks an export against its records; the report lists `problems` (empty: everything matches)."""
    from dit_graft.export import GRAFT_JSON
    from dit_graft.plan import GraftPlan

    path = Path(path)
    if not path.is_dir():
        raise IntegrityError(f"{path}: no such export directory")
    problems: list[str] = []
    report: dict[str, Any] = {"export": str(path), "problems": problems}
    manifest_file = path / INTEGRITY_NAME
    if not manifest_file.is_file():
        raise IntegrityError(
            f"{path}: no {INTEGRITY_NAME} (not a dit-graft export, or exported before checksums were recorded)"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
        recorded = manifest["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise IntegrityError(f"{manifest_file}: unreadable ({e})") from None
    for name, entry in sorted(recorded.items()):
        f = path / name
        if not f.is_file():
            problems.append(f"{name}: missing")
        elif f.stat().st_size != entry["bytes"]:
            change = "truncated" if f.stat().st_size < entry["bytes"] else "size changed"
            problems.append(f"{name}: {change} ({f.stat().st_size} bytes, {entry['bytes']} recorded)")
        elif sha256(f) != entry["sha256"]:
            problems.append(f"{name}: contents changed (sha256 differs from the recorded one)")
    report["files_checked"] = len(recorded)
    report["files_added"] = [n for n in _files(path) if n not in recorded]

    graft = None
    try:
        graft = json.loads((path / GRAFT_JSON).read_text())
    except (OSError, json.JSONDecodeError) as e:
        problems.append(f"{GRAFT_JSON}: unreadable ({e})")
    if graft is not None:
        written = str(graft.get("dit_graft_version", ""))
        report["dit_graft_version"] = written
        report["teacher"] = graft.get("recipe", {}).get("model", {}).get("source")
        report["dtype"] = graft.get("dtype", "float32")
        if not _version(written):
            problems.append(f"{GRAFT_JSON}: no valid dit_graft_version ({written!r})")
        elif _version(written) > _version(__version__):
            problems.append(f"{GRAFT_JSON}: written by dit-graft {written}, newer than the installed {__version__}")
        try:
            graft_plan = GraftPlan.model_validate(graft["plan"])
            report["family"], report["base_class"] = graft_plan.family, graft_plan.base_class
            config = json.loads((path / "config.json").read_text())
            if config.get("_class_name") != graft_plan.base_class:
                problems.append(
                    f"config.json: class {config.get('_class_name')!r}, the plan's is {graft_plan.base_class!r}"
                )
        except (KeyError, ValueError, OSError) as e:
            problems.append(f"{GRAFT_JSON}/config.json: does not describe this export ({str(e).splitlines()[0]})")

    if graft is not None:
        _check_forward(path, graft, problems, report)
    return report


def _check_forward(path: Path, graft: dict, problems: list[str], report: dict[str, Any]) -> None:
    """Reloads the export (strictly, against its plan) and reruns the recorded forward."""
    from dit_graft.export import from_pretrained

    spec = graft.get("verify")
    if spec is None:
        problems.append("graft.json: no recorded forward (verify)")
        return
    try:
        model = from_pretrained(path, "cpu")
    except IntegrityError as e:
        problems.append(f"reload: {e}")
        return
    except Exception as e:  # a config the class rejects, a plan that does not apply
        problems.append(f"reload: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return
    try:
        with safe_open(str(path / spec["file"]), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        inputs = _unflatten(spec["inputs"], tensors)
        expected = tensors["output"]
    except Exception as e:
        problems.append(f"{spec.get('file', VERIFY_NAME)}: unreadable ({str(e).splitlines()[0]})")
        return
    try:
        output = _forward(model, inputs)
    except Exception as e:
        problems.append(f"forward: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return
    if output.shape != expected.shape:
        problems.append(f"forward: output shape {tuple(output.shape)}, recorded {tuple(expected.shape)}")
        return
    rel = ((output - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    report["forward_relative_error"] = rel
    tol = TOLERANCE.get(report.get("dtype", "float32"), 1e-4)
    if not rel <= tol:
        problems.append(f"forward: output differs from the recorded one (relative error {rel:.3g} > {tol:g})")
