"""The modeling file an export carries so that stock diffusers loads the student where dit-graft is not installed.

    out/
      modeling_dit_graft.py   dit-graft's own runtime sources, assembled at export time (this module)
      config.json             + "auto_map": {"AutoModel": "modeling_dit_graft.DitGraftStudent"}

`diffusers.AutoModel.from_pretrained(out, trust_remote_code=True)` (diffusers' dynamic modules: it copies the
modeling file of a local directory into its modules cache, imports it, and calls the `auto_map` class's
`from_pretrained`) then returns the same model `dit_graft.from_pretrained(out)` returns: the base diffusers class
with the recorded plan re-applied and every weight loaded strictly.

One source of truth: the file is not a second copy of the operators kept by hand. `assemble()` takes the source of
every dit-graft module the loader can reach (the import closure of the package root, `dit_graft.export` and
`dit_graft.kernels`, function-level imports included; the Triton kernels ride along and are imported only where
they run), renames the package in its import statements to a private name (`_dit_graft_<hash of the sources>`, so
exports from different dit-graft versions load side by side and never shadow an installed dit-graft), and embeds
them; a meta-path finder in the file imports them from there. The kernels dispatch as in dit-graft: Triton on CUDA
when the `triton` package imports, the bounded-memory PyTorch paths elsewhere, `DIT_GRAFT_KERNELS` honoured.

The file needs what dit-graft's loader imports: torch, diffusers, safetensors, accelerate, pydantic and pyyaml.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path

from dit_graft import __version__

MODULE_FILE = "modeling_dit_graft.py"
CLASS_NAME = "DitGraftStudent"
AUTO_MAP = {"AutoModel": f"{MODULE_FILE[:-3]}.{CLASS_NAME}"}
PACKAGE = "dit_graft"
EXTENSIONS = "_extensions"
ROOTS = (PACKAGE, f"{PACKAGE}.export", f"{PACKAGE}.kernels")
_IMPORT = re.compile(rf"^(\s*(?:from|import)\s+){PACKAGE}(?=[\s.])", re.MULTILINE)


def _spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _imported(name: str, is_package: bool, tree: ast.AST) -> set[str]:
    """The dit-graft modules a module's import statements name (module- and function-level, relative resolved)."""
    base = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base
                for _ in range(node.level - 1):
                    parent = parent.rpartition(".")[0]
                module = f"{parent}.{node.module}" if node.module else parent
            else:
                module = node.module or ""
            candidates = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for c in candidates:
            if (c == PACKAGE or c.startswith(f"{PACKAGE}.")) and (s := _spec(c)) is not None and s.origin:
                found.add(c)
    return found


def runtime_sources(extensions: tuple[str, ...] = ()) -> dict[str, tuple[bool, str]]:
    """Module name relative to the package ("" for the root) → (is a package, source), for the import closure.

    `extensions`: modules outside the package that register an operator or family a plan uses (docs/extending.md);
    each is embedded as `_extensions.<name>` (dots → "__") and imported after the root package, so their
    registrations exist in the embedded registries too.
    """
    sources: dict[str, tuple[bool, str]] = {}
    todo = list(ROOTS)
    for name in extensions:
        if name == "__main__":  # embedding a script would run all of it at every load
            raise RuntimeError("an operator or family defined in the __main__ script cannot be embedded")
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None)
        if origin is None or not origin.endswith(".py"):
            raise RuntimeError(f"standalone: no Python source for the extension module {name}")
        source = Path(origin).read_text(encoding="utf-8")
        sources[f"{EXTENSIONS}.{name.replace('.', '__')}"] = (False, source)
        todo.extend(_with_parents(_imported(name, False, ast.parse(source, origin))))
    while todo:
        name = todo.pop()
        key = name[len(PACKAGE) + 1 :]
        if key in sources:
            continue
        spec = _spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise RuntimeError(f"standalone: no Python source for {name}")
        source = Path(spec.origin).read_text(encoding="utf-8")
        is_package = spec.submodule_search_locations is not None
        sources[key] = (is_package, source)
        todo.extend(_with_parents(_imported(name, is_package, ast.parse(source, spec.origin))))
    if extensions:
        sources[EXTENSIONS] = (True, '"""Modules outside dit-graft that registered what this plan uses."""\n')
    return dict(sorted(sources.items()))


def _with_parents(modules: set[str]) -> set[str]:
    return modules | {m.rsplit(".", i)[0] for m in modules for i in range(1, m.count(".") + 1)}


def extension_modules(graft: dict) -> tuple[str, ...]:
    """The modules outside dit-graft that define the family or an operator a graft.json's plan uses."""
    from dit_graft.families import FAMILIES
    from dit_graft.operators import OPERATORS

    plan = graft["plan"]
    owners = {type(FAMILIES.get(plan["family"])).__module__}
    owners |= {OPERATORS.get(e["op"]).options.__module__ for e in plan["edits"]}
    return tuple(sorted(m for m in owners if m != PACKAGE and not m.startswith(f"{PACKAGE}.")))


def private_name(sources: dict[str, tuple[bool, str]]) -> str:
    digest = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:12]
    return f"_dit_graft_{digest}"


def rename(source: str, package: str, where: str) -> str:
    """`source` with the package renamed in its import statements; raises where an import of it was left unrenamed."""
    out = _IMPORT.sub(lambda m: m.group(1) + package, source)
    for node in ast.walk(ast.parse(out, where)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        if any(n == PACKAGE or n.startswith(f"{PACKAGE}.") for n in names):
            raise RuntimeError(f"standalone: {where} line {node.lineno}: an import of {PACKAGE} was not renamed")
    return out


def assemble(extensions: tuple[str, ...] = ()) -> str:
    """The text of the modeling file (see the module docstring); assembled once per process and extension sources
    (dit-graft's own files do not change under a running process; reading and parsing them takes about 0.5 s)."""
    files = [getattr(sys.modules.get(n), "__file__", None) for n in extensions]
    texts = tuple(Path(f).read_text() if f and Path(f).is_file() else "" for f in files)
    return _assemble(extensions, texts)


@functools.lru_cache(maxsize=8)
def _assemble(extensions: tuple[str, ...], texts: tuple[str, ...]) -> str:
    sources = runtime_sources(extensions)
    package = private_name(sources)
    renamed = {k: (pkg, rename(src, package, f"{PACKAGE}.{k}".rstrip("."))) for k, (pkg, src) in sources.items()}
    entries = "\n".join(f"    {k!r}: ({pkg!r}, {src!r})," for k, (pkg, src) in renamed.items())
    imports = [f"{EXTENSIONS}.{name.replace('.', '__')}" for name in extensions]
    return (
        _TEMPLATE.replace("@VERSION@", __version__)
        .replace("@PACKAGE@", package)
        .replace("@EXTENSIONS@", repr(imports))
        .replace("@SOURCES@", entries)
    )


def write(directory: Path) -> bool:
    """Writes the modeling file into an export directory and adds the `auto_map` entry to its config.json.

    An operator or family registered from code without a source file (a notebook cell) cannot be embedded: the
    export then goes without the modeling file (a warning says why) and loads with dit-graft only. Returns whether
    the file was written.
    """
    directory = Path(directory)
    extensions = extension_modules(json.loads((directory / "graft.json").read_text()))
    try:
        text = assemble(extensions)
    except RuntimeError as e:
        warnings.warn(f"{directory.name}: no {MODULE_FILE} ({e}); the export loads with dit-graft only", stacklevel=2)
        return False
    (directory / MODULE_FILE).write_text(text, encoding="utf-8")
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = dict(AUTO_MAP)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


_TEMPLATE = '''\
# Generated by dit-graft @VERSION@ at export time. Do not edit: it is dit-graft's own loader, embedded.
"""Loads this dit-graft student with stock diffusers, without dit-graft installed:

    from diffusers import AutoModel
    model = AutoModel.from_pretrained("path/to/export", trust_remote_code=True)

returns the base diffusers class with the recorded plan (graft.json) re-applied and the weights loaded strictly,
the same model `dit_graft.from_pretrained` builds. dit-graft's runtime modules are embedded below as source and
imported under the private package name @PACKAGE@. Needs torch, diffusers, safetensors, accelerate, pydantic and
pyyaml; Triton kernels run on CUDA where the `triton` package imports, PyTorch paths everywhere else.
"""

import importlib
import importlib.abc
import importlib.machinery
import os
import sys

DIT_GRAFT_VERSION = "@VERSION@"
PACKAGE = "@PACKAGE@"
_EXTENSIONS = @EXTENSIONS@  # modules outside dit-graft that registered an operator or family this plan uses
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")

_SOURCES = {
@SOURCES@
}


class _EmbeddedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports PACKAGE and its submodules from _SOURCES (get_source serves inspect, linecache and Triton)."""

    package = PACKAGE

    def __init__(self, sources, root):
        self.sources = sources
        self.root = root

    def _key(self, fullname):
        if fullname == self.package:
            return ""
        if fullname.startswith(self.package + "."):
            return fullname[len(self.package) + 1 :]
        return None

    def find_spec(self, fullname, path=None, target=None):
        key = self._key(fullname)
        if key is None or key not in self.sources:
            return None
        is_package = self.sources[key][0]
        spec = importlib.machinery.ModuleSpec(fullname, self, origin=self._filename(key), is_package=is_package)
        spec.has_location = True  # sets __file__ (a path under the modeling file's directory that does not exist)
        return spec

    def _filename(self, key):
        parts = key.split(".") if key else []
        is_package = self.sources[key][0]
        tail = parts + ["__init__.py"] if is_package else parts[:-1] + [parts[-1] + ".py"]
        return os.path.join(self.root, self.package, *tail)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        key = self._key(module.__name__)
        code = compile(self.sources[key][1], self._filename(key), "exec", dont_inherit=True)
        exec(code, module.__dict__)

    def get_source(self, fullname):
        return self.sources[self._key(fullname)][1]

    def is_package(self, fullname):
        return self.sources[self._key(fullname)][0]


def runtime():
    """The embedded dit-graft package (imported once per process and version)."""
    if not any(getattr(f, "package", None) == PACKAGE for f in sys.meta_path):
        sys.meta_path.append(_EmbeddedFinder(_SOURCES, os.path.dirname(os.path.abspath(__file__))))
    package = importlib.import_module(PACKAGE)
    for name in _EXTENSIONS:
        importlib.import_module(f"{PACKAGE}.{name}")
    return package


def _local_directory(path, subfolder, hub_kwargs):
    path = os.fspath(path)
    if not os.path.isdir(path):  # a hub repository id: its files, through huggingface_hub's cache
        from huggingface_hub import snapshot_download

        allow = [f"{subfolder}/*"] if subfolder else None
        kwargs = {k: v for k, v in hub_kwargs.items() if v is not None and k != "force_download"}
        path = snapshot_download(path, allow_patterns=allow, **kwargs)
    return os.path.join(path, subfolder) if subfolder else path


class DitGraftStudent:
    """The `auto_map` entry of config.json: its from_pretrained builds the student of this export."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, torch_dtype=None, device_map=None, **kw):
        kwargs = kw
        hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        unknown = sorted(k for k, v in kwargs.items() if v is not None)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained: unsupported argument(s) {', '.join(unknown)}")
        if device_map is not None and not isinstance(device_map, str):
            raise TypeError(f"{cls.__name__}.from_pretrained: device_map must name one device (e.g. 'cuda')")
        directory = _local_directory(pretrained_model_name_or_path, subfolder, hub_kwargs)
        runtime()
        export = importlib.import_module(PACKAGE + ".export")
        model = export.from_pretrained(directory, device=device_map or "cpu")
        return model if torch_dtype is None else model.to(torch_dtype)
'''
