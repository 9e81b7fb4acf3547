"""The package's layers (DESIGN.md): no import cycles, training imports nothing from labelling, no private name
imported across modules, and the ground (format/, inputs/) imports no torch. Read from the source, imports inside
functions included."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "transferset"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(mods: dict[str, Path]) -> dict[str, list[tuple[str, str]]]:
    """Module -> ``(imported module, imported name)`` for every import in it, at any depth."""
    out: dict[str, list[tuple[str, str]]] = {}
    for mod, p in mods.items():
        pkg = mod.split(".") if p.name == "__init__.py" else mod.split(".")[:-1]
        got = []
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                for a in node.names:
                    full = f"{base}.{a.name}"
                    got.append((full if full in mods else base, a.name))
            elif isinstance(node, ast.Import):
                got += [(a.name, "") for a in node.names]
        out[mod] = got
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_and_training_imports_nothing_from_labelling():
    mods = _modules()
    imports = _imports(mods)
    edges = {m: {t for t, _ in got if t in mods and t != m and t != "transferset"} for m, got in imports.items()}
    assert _cycles(edges) == []
    training = {(m, t) for m, ts in edges.items() if m.startswith("transferset.training") for t in ts
                if t.startswith("transferset.labelling")}
    assert training == set()


#: the layers, lowest first (DESIGN.md): the ground, the two stages' rooms, and the face (every other module)
_GROUND = ("transferset.errors", "transferset.options", "transferset._io", "transferset.devices",
           "transferset.progress", "transferset.wording", "transferset.targets", "transferset.format",
           "transferset.inputs")
_ROOMS = ("transferset.labelling", "transferset.training")


def _layer(mod: str) -> int:
    if mod == "transferset" or mod.startswith(tuple(g + "." for g in _GROUND)) or mod in _GROUND:
        return 0
    return 1 if mod.startswith(tuple(r + "." for r in _ROOMS)) or mod in _ROOMS else 2


def test_nothing_imports_upwards():
    """The ground imports no room and no face module; a room imports no face module (cli, evaluate, lm_metrics,
    report, ...), so no room reaches the other room through one."""
    mods = _modules()
    up = sorted((m, t) for m, got in _imports(mods).items() for t, _ in got
                if t in mods and t != "transferset" and _layer(t) > _layer(m))
    assert up == []
    assert _layer("transferset.format.schema") == 0 and _layer("transferset.training.loop") == 1
    assert _layer("transferset.lm_metrics") == 2 and _layer("transferset.options") == 0


def test_no_private_name_is_imported_across_modules():
    mods = _modules()
    private = [(m, t, name) for m, got in _imports(mods).items() for t, name in got
               if t.startswith("transferset") and name.startswith("_") and not name.startswith("__")
               and t != m]
    assert private == []


def test_the_ground_imports_no_torch_and_no_onnx_runtime():
    mods = _modules()
    ground = [m for m in mods if m.startswith(("transferset.format", "transferset.inputs"))]
    heavy = [(m, t) for m in ground for t, _ in _imports(mods)[m] if t.split(".")[0] in ("torch", "onnxruntime")]
    assert ground and heavy == []


def test_no_function_is_over_60_lines():
    long = []
    for mod, p in _modules().items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{mod}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []
