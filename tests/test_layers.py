"""Layers point one way (STYLE.md rule 13): every import in every module, at the top or
inside a function, is read with ``ast`` and checked against the layer map below.

    earthgptx    the model (PyTorch reference, processing, data, training, evaluation)
    runners      engines: runners, manifest, opening a build, TensorRT device tags, prompt tables
    calibration  the INT8 calibration set and the feeds each part sees
    export | runtime   the exporters | the ZeroMQ server and client (peers: neither imports the other)
    benchmarks   measures the runners in process and the server through its client
    egx          the ``egx`` dispatcher: composes every command line

A module may import its own package and packages of a lower layer only; peers and higher
layers never. The module graph (all packages together) has no cycle."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from conftest import REPO

LAYERS = {"earthgptx": 0, "runners": 1, "calibration": 2, "export": 3, "runtime": 3, "benchmarks": 4, "egx": 5}
NOT_PACKAGES = {"tests", "docs", "clients", "engines", "build"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in sorted((REPO / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _target(name: str) -> str:
    """The module ``name`` loads: itself, or the nearest enclosing module that exists here
    (``earthgptx.config.PART_NAMES`` -> ``earthgptx.config``); third-party names stay as they are."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return name


def imports(module: str, path: Path | None = None) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import statement in ``module``, at any depth,
    and every ``importlib.import_module("...")``/``__import__("...")`` with a literal name."""
    path = path or MODULES[module]
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(_target(a.name), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base_parts = package_parts[:len(package_parts) - node.level + 1] if node.level else []
            base = ".".join(base_parts + ([node.module] if node.module else []))
            for a in node.names:  # ``from pkg import submodule`` imports the submodule
                full = f"{base}.{a.name}"
                out.append((full if full in MODULES else _target(base), node.lineno))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.append((_target(node.args[0].value), node.lineno))
    return out


def _package(module: str) -> str:
    return module.split(".")[0]


def test_every_python_package_has_a_layer():
    """A new top-level package must be placed in the layer map (and installed)."""
    tops = {p.relative_to(REPO).parts[0] for p in REPO.glob("*/**/*.py")} - NOT_PACKAGES
    tops = {t for t in tops if not t.startswith(".")}  # .venv, .git, ...
    assert tops <= set(LAYERS), f"top-level packages without a layer: {sorted(tops - set(LAYERS))}"
    for package in LAYERS:
        assert (REPO / package / "__init__.py").is_file(), f"{package}/ is not a package"
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in include} == set(LAYERS), f"pyproject installs {include}, layers are {sorted(LAYERS)}"


def test_the_console_script_is_the_dispatcher():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert _package(scripts["egx"].split(":")[0]) == "egx"


def test_imports_point_down():
    """No module imports a peer or a higher layer, not even lazily inside a function."""
    bad = []
    for module in MODULES:
        src = _package(module)
        for target, line in imports(module):
            dst = _package(target)
            if dst in LAYERS and dst != src and LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{MODULES[module].relative_to(REPO)}:{line} imports {target} "
                           f"({src}, layer {LAYERS[src]} -> {dst}, layer {LAYERS[dst]})")
    assert not bad, "imports that do not point down:\n  " + "\n  ".join(dict.fromkeys(bad))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        component.append(m)
                        if m == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def test_no_import_cycles():
    """The module graph, lazy imports included, has no cycle: none across packages (the
    old ``earthgptx.cli`` <-> ``runtime.cli``, ``export.tensorrt_build`` <->
    ``runtime.tensorrt_runner``) and none inside one (the old ``bench`` <-> ``bench_zmq``)."""
    graph = {m: {t for t, _ in imports(m) if t in MODULES and t != m} for m in MODULES}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_lazy_relative_and_dynamic_imports(tmp_path):
    """The parser itself, on a module written here: imports inside functions, relative
    imports (``from . import x`` as a submodule), and ``importlib.import_module``."""
    path = tmp_path / "fake.py"
    path.write_text("import numpy\n"
                    "def f():\n"
                    "    from .processing import VisualPrompts\n"
                    "    from . import config\n"
                    "    import importlib\n"
                    "    importlib.import_module('runtime.client')\n")
    found = [t for t, _ in imports("earthgptx.fake", path)]
    assert found == ["numpy", "earthgptx.processing", "earthgptx.config", "importlib", "runtime.client"]
