"""The package's layers (docs/architecture.md): no module imports a higher layer, no cycles."""

import ast
import os

import pytest

_PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "modit_jax")

# Lowest first; a module may import its own layer and the ones before it.
LAYERS = (
    ("foundations", {"errors", "variants", "config_files", "stopping", "catalog", "metrics",
                     "stats", "memo", "sizing", "retrieval", "diffusion", "dit", "evidence",
                     "novelty"}),
    ("models and runs", {"metric_predictor", "models", "engine", "run_dir", "generator"}),
    ("serving", {"retriever"}),
    # stages.base < the stage modules < stages (the registry) < training, inside one layer.
    ("training", {"data", "sequence_locality", "clusters", "trajectories", "query_split",
                  "oracle", "hppo", "stages.base", "stages.pretrain", "stages.cpt",
                  "stages.sft", "stages.hppo", "stages", "training"}),
    ("evaluation", {"baselines", "generative", "evaluation", "results_markdown", "report",
                    "pooling", "properties"}),
    ("orchestration", {"workflow", "synthetic", "byo", "music_catalog", "text_catalog",
                       "text_encoder"}),
    # cli.app is the binaries' shared start-up; the package's __init__ imports nothing.
    ("binaries", {"cli", "cli.app", "cli.train", "cli.evaluate", "cli.retrieve",
                  "cli.build_index", "cli.make_dataset", "cli.make_music_catalog",
                  "cli.convert_catalog", "cli.pipeline", "cli.protocol", "cli.results_tables"}),
)
_LAYER_OF = {m: i for i, (_, modules) in enumerate(LAYERS) for m in modules}


def _modules() -> list[str]:
  """Every module of the package, dotted below it: a subpackage is its `__init__`."""
  found = []
  for folder, _, files in os.walk(_PACKAGE):
    prefix = os.path.relpath(folder, _PACKAGE).replace(os.sep, ".")
    prefix = "" if prefix == "." else prefix
    for name in files:
      if name.endswith(".py"):
        module = prefix if name == "__init__.py" else ".".join(filter(None, (prefix, name[:-3])))
        if module:
          found.append(module)
  return sorted(found)


def _path(module: str) -> str:
  path = os.path.join(_PACKAGE, *module.split("."))
  return os.path.join(path, "__init__.py") if os.path.isdir(path) else f"{path}.py"


def _imports(module: str) -> set[str]:
  """The modit_jax modules `module` imports, at any depth of its code (dotted below it)."""
  modules = set(_modules())
  with open(_path(module)) as f:
    tree = ast.parse(f.read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modit_jax"):
      parent = node.module[len("modit_jax."):] if node.module != "modit_jax" else ""
      for alias in node.names:  # `from modit_jax.x import y`: y is a module or a name of x
        child = ".".join(filter(None, (parent, alias.name)))
        out.add(child if child in modules else parent)
    elif isinstance(node, ast.Import):
      out.update(a.name[len("modit_jax."):] for a in node.names
                 if a.name.startswith("modit_jax."))
  out.discard("")
  return out


def test_every_module_has_a_layer():
  assert sorted(set(_modules()) - set(_LAYER_OF)) == []
  assert sorted(set(_LAYER_OF) - set(_modules())) == []  # the table names no stale module


@pytest.mark.parametrize("module", _modules())
def test_no_module_imports_a_higher_layer(module):
  higher = sorted(m for m in _imports(module) if _LAYER_OF[m] > _LAYER_OF[module])
  assert not higher, (f"{module} ({LAYERS[_LAYER_OF[module]][0]}) imports "
                      f"{[(m, LAYERS[_LAYER_OF[m]][0]) for m in higher]}")


def test_no_import_cycles():
  graph = {m: _imports(m) for m in _modules()}
  state = {}  # module -> "open" while on the walk's stack, "done" after

  def walk(module, path):
    state[module] = "open"
    for dep in sorted(graph[module]):
      assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [module, dep])}"
      if dep not in state:
        walk(dep, path + [module])
    state[module] = "done"

  for module in graph:
    if module not in state:
      walk(module, [])


@pytest.mark.parametrize("module", _modules())
def test_the_library_never_imports_the_configs_folder(module):
  """configs/ imports the library, never the reverse: binaries run from any directory."""
  with open(_path(module)) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
             [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
    assert not [n for n in names if n == "configs" or n.startswith("configs.")], module
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      assert not node.value.startswith("configs."), f"{module}: {node.value!r}"
