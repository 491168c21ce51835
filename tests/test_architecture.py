"""The package's import rules (docs/architecture.md, "Layout"), read from the source with `ast`:

- imports flow down the layers below, or stay inside one package;
- no import cycle between modules;
- no private name (`_x`) of one module used by another;
- no function-local import of a rag_jax module, and a function-local import of another
  library (an optional or slow dependency deferred on purpose) carries a comment saying so;
- no script edits sys.path.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rag_jax"

# Lower numbers sit lower: a module may import from a lower layer or from its own package.
LAYERS = {
    "rag_jax.utils": 0,
    "rag_jax.parallel": 1, "rag_jax.distributed": 1, "rag_jax.models": 1,
    "rag_jax.checkpoints": 2, "rag_jax.losses": 2, "rag_jax.metrics": 2, "rag_jax.data": 2,
    "rag_jax.retrieval": 3,
    "rag_jax.decoding": 4,
    "rag_jax.training": 5,
    "rag_jax.answer": 6,
    "rag_jax.evaluation": 7,
    "rag_jax.experiments": 8,
    "rag_jax.commands": 9,
}


def module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
  """The layer entry a module belongs to (its package, or itself for a top-level module)."""
  parts = module.split(".")
  for n in (2, 1):
    name = ".".join(parts[:n])
    if name in LAYERS:
      return name
  raise KeyError(f"{module} belongs to no layer of LAYERS: add it there and to "
                 "docs/architecture.md")


def package_modules() -> dict[str, ast.Module]:
  return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(tree: ast.Module, module: str) -> list[tuple[ast.stmt, str, list[str]]]:
  """(statement, imported module, names) for every import in the tree, relative ones resolved."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(node, a.name, []) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
      out.append((node, base, [a.name for a in node.names]))
  return out


def internal_targets(target: str, names: list[str], known: set[str]) -> list[str]:
  """The rag_jax modules an import statement depends on (`from pkg import module` counts as
  the submodule)."""
  if not target.startswith("rag_jax"):
    return []
  subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
  return subs or [target]


def test_layers_cover_every_module():
  for module in package_modules():
    if module != "rag_jax":
      unit(module)


def test_imports_flow_down():
  modules = package_modules()
  known = set(modules)
  wrong = []
  for module, tree in modules.items():
    if module == "rag_jax":
      continue
    here = unit(module)
    for node, target, names in imported(tree, module):
      for dep in internal_targets(target, names, known):
        there = unit(dep)
        if there != here and LAYERS[there] >= LAYERS[here]:
          wrong.append(f"{module}:{node.lineno} imports {dep} ({there}, layer {LAYERS[there]} "
                       f">= {here}'s {LAYERS[here]})")
  assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
  modules = package_modules()
  known = set(modules)
  graph = {m: sorted({d for _, t, n in imported(tree, m) for d in internal_targets(t, n, known)
                      if d in known and d != m and not m.startswith(d + ".")})
           for m, tree in modules.items()}
  state: dict[str, int] = {}
  cycles = []

  def visit(m: str, path: list[str]) -> None:
    state[m] = 1
    for d in graph[m]:
      if state.get(d) == 1:
        cycles.append(" -> ".join(path[path.index(d):] + [d]))
      elif d not in state:
        visit(d, path + [d])
    state[m] = 2

  for m in graph:
    if m not in state:
      visit(m, [m])
  assert not cycles, "\n".join(cycles)


def _private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize("folder", ["rag_jax", "benchmarks", "tests"])
def test_no_private_names_across_modules(folder):
  files = [p for p in (ROOT / folder).rglob("*.py")] + (
      [ROOT / f for f in ("train.py", "evaluate.py", "benchmark.py") if (ROOT / f).exists()]
      if folder == "rag_jax" else [])
  known = set(package_modules())
  wrong = []
  for path in files:
    tree = ast.parse(path.read_text(), str(path))
    aliases = {}  # local name -> rag_jax module it is bound to
    for node, target, names in imported(tree, module_name(path)):
      if not target.startswith("rag_jax"):
        continue
      wrong += [f"{path.name}:{node.lineno} imports {target}.{n}" for n in names if _private(n)]
      if isinstance(node, ast.Import):
        for a in node.names:
          aliases[(a.asname or a.name).split(".")[0]] = a.name
      else:
        for a in node.names:
          if f"{target}.{a.name}" in known:
            aliases[a.asname or a.name] = f"{target}.{a.name}"
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and _private(node.attr)
          and isinstance(node.value, ast.Name) and node.value.id in aliases):
        wrong.append(f"{path.name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
  assert not wrong, "\n".join(wrong)


def test_function_local_imports_are_deliberate():
  wrong = []
  for path in sorted(PACKAGE.rglob("*.py")):
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines), str(path))
    for fn in ast.walk(tree):
      if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
        continue
      for node in ast.walk(fn):
        if not isinstance(node, ast.Import | ast.ImportFrom):
          continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        where = f"{path.relative_to(ROOT)}:{node.lineno}"
        if any((n or "").startswith("rag_jax") or (isinstance(node, ast.ImportFrom)
                                                   and node.level) for n in names):
          wrong.append(f"{where}: function-local import of {names}")
        elif "#" not in lines[node.lineno - 1] and "#" not in lines[node.lineno - 2]:
          wrong.append(f"{where}: function-local import of {names} without a comment saying why")
  assert not wrong, "\n".join(wrong)


def test_no_sys_path_edits():
  scripts = [p for p in ROOT.rglob("*.py") if not any(
      part.startswith(".") for part in p.relative_to(ROOT).parts) and p != Path(__file__)]
  edits = [f"{p.relative_to(ROOT)}" for p in scripts if "sys.path" in p.read_text()]
  assert not edits, edits
