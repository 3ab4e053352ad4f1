"""The package as others use it: import order between rooms, no import
circles, no TensorFlow until data is touched, requirements in step."""

import ast
import os
import subprocess
import sys
import textwrap
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "brnpa_jax")

# A module may import only from rooms of the same or a lower rank.
RANKS = {
    "errors": 0, "choices": 0, "outputs": 0, "quiet": 0, "cli": 1, "artifact": 1,
    "attention": 1, "models": 2, "data": 3, "runs": 4, "config_args": 4,
    "config_check": 4, "config_file": 4, "recipes": 5, "tasks": 6,
    "train": 7, "explain": 8,
    # Command-line tools and the package's front door sit on top.
    "predict": 9, "export": 9, "sweep": 9, "tools": 9, "__init__": 9,
}


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        yield rel.removesuffix(".__init__"), path


def _room(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: str, module: str) -> list[tuple[str, bool]]:
  """``(imported brnpa_jax module, at module level)`` for each import."""
  tree = ast.parse(open(path).read())
  top = {id(n) for n in tree.body}
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      # ``from brnpa_jax import x`` runs the package's __init__, which any
      # import of a submodule does anyway: only x counts.
      names = [f"{base}.{a.name}" for a in node.names] + (
          [base] if base != "brnpa_jax" else [])
    out += [(n, id(node) in top) for n in names if n.startswith("brnpa_jax")]
  return out


def test_rooms_import_downwards_only():
  bad = []
  for module, path in _modules():
    room = _room(module)
    assert room in RANKS, f"{module}: add its room to RANKS"
    for target, _ in _imports(path, module):
      other = _room(target)
      if other in RANKS and other != room and RANKS[other] > RANKS[room]:
        bad.append(f"{module} imports {target}")
  assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_circles():
  known = {m for m, _ in _modules()}
  graph = {}
  for module, path in _modules():
    deps = set()
    for target, top_level in _imports(path, module):
      while target and target not in known:  # brnpa_jax.models.X -> module
        target = target.rpartition(".")[0]
      if target and target != module and top_level:
        deps.add(target)
    graph[module] = deps
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = "open"
    for dep in sorted(graph.get(node, ())):
      if dep.startswith(node + "."):
        continue  # a package importing its own submodules
      if state.get(dep) == "open":
        cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
      elif dep not in state:
        visit(dep, stack + [dep])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_no_tensorflow_until_data_is_read(tmp_path):
  """From another directory: the operator, the models and every config file
  load without TensorFlow."""
  script = textwrap.dedent(f"""
      import glob, importlib.util, os, sys
      import brnpa_jax
      brnpa_jax.brnpa, brnpa_jax.brnpa_single, brnpa_jax.BRNPAOutput
      assert "tensorflow" not in sys.modules, "brnpa_jax"
      import brnpa_jax.models
      assert "tensorflow" not in sys.modules, "brnpa_jax.models"
      for path in sorted(glob.glob(os.path.join({REPO!r}, "configs", "*.py"))):
        name = os.path.basename(path)[:-3]
        if name == "__init__":
          continue
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.get_config("runlocal,root=/data" if name == "fewshot_folder"
                          else "runlocal")
        assert "tensorflow" not in sys.modules, path
      import brnpa_jax.runs, brnpa_jax.tasks.reid, brnpa_jax.predict
      assert "tensorflow" not in sys.modules, "runs, tasks, predict"
      print("ok")
  """)
  env = dict(os.environ, PYTHONPATH=REPO)
  done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def _requirements(path):
  with open(path) as f:
    return {l.split("#")[0].strip() for l in f if l.split("#")[0].strip()}


def test_requirements_match_the_package():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  declared = set(project["dependencies"]) | set(
      project["optional-dependencies"]["test"])
  assert _requirements(os.path.join(REPO, "requirements.txt")) == declared
  assert project["requires-python"] == ">=3.11"
