"""k15's module graph: no import cycles, and building a config imports no stage."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> dict[str, str]:
  """Module name -> file, for every .py under k15/."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, "k15")):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        out[".".join(rel)] = os.path.join(dirpath, f)
  return out


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
  """The k15 modules `path` imports anywhere in its body (function-level imports included)."""
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      # `from k15 import sft` imports the module k15.sft; `from k15.x import f`, k15.x.
      subs = {f"{base}.{a.name}" for a in node.names} & set(modules)
      found.update(subs or {base})
  # A module reaching into its own package (rollout: `from k15.sampling import sampler`) is
  # how packages work, not a cycle.
  return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1 = on the stack, 2 = done
  stack: list[str] = []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(graph[n]):
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if m not in state:
        cycle = visit(m)
        if cycle:
          return cycle
    stack.pop()
    state[n] = 2
    return None

  for n in sorted(graph):
    if n not in state:
      cycle = visit(n)
      if cycle:
        return cycle
  return None


def test_the_walker_sees_imports_and_finds_a_cycle():
  graph = _graph()
  # The walker resolves `from k15 import x` and function-level imports.
  assert "k15.parallel" in graph["k15.config"]
  assert "k15.model.build" in graph["k15.evaluate"]  # imported inside evaluate.run
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_k15_modules():
  cycle = _find_cycle(_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_config_imports_no_stage():
  graph = _graph()
  stages = {"k15.sft", "k15.evaluate", "k15.pipeline", "k15.long2short", "k15.rl.trainer",
            "k15.checkpoint"}
  assert not graph["k15.config"] & stages
  # Building the tiny config loads neither orbax nor grain nor the RL stack.
  code = ("import sys; from configs import tiny_cpu; tiny_cpu.get_config(); "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('orbax', 'grain') "
          "or m in ('k15.rl.trainer', 'k15.sft', 'k15.pipeline', 'k15.evaluate')))")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == "[]"


def test_long2short_does_not_depend_on_the_pipeline():
  """long2short composes the shared stages (k15.rl.stage, k15.sft, k15.evaluate) and reads a
  finished pipeline's files; no module of it reaches k15.pipeline, directly or through others."""
  graph = _graph()
  start = [m for m in graph if m == "k15.long2short" or m.startswith("k15.long2short.")]
  assert len(start) >= 5  # the package, merge, rejection, dpo, rl, driver
  seen, todo = set(), list(start)
  while todo:
    m = todo.pop()
    if m not in seen:
      seen.add(m)
      todo.extend(graph[m])
  assert "k15.rl.stage" in seen and "k15.pipeline" not in seen
