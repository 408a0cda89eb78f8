"""The package's imports run one way: model <- peft <- casa <- io <- infer <- train <- eval <- CLIs.

Every ``import`` in every module counts, the lazy ones inside functions included, so no change can
quietly add a back edge (a lower layer reaching up into a higher one)."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "casa_jax")

# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS = (
    ("base", ("casa_jax.paths", "casa_jax.storage", "casa_jax.distributed", "casa_jax.data", "casa_jax.__init__")),
    ("model", ("casa_jax.model", "casa_jax.processing", "casa_jax.attacks")),
    ("peft", ("casa_jax.peft", "casa_jax.sharding")),
    ("casa", ("casa_jax.casa",)),
    ("io", ("casa_jax.io", "casa_jax.tiny")),
    ("infer", ("casa_jax.infer",)),
    ("train", ("casa_jax.train",)),
    ("eval", ("casa_jax.eval",)),
    ("cli", ("casa_jax.cli", "casa_jax.convert", "casa_jax.generate", "casa_jax.evaluate", "casa_jax.train.__main__",
             "casa_jax.parity", "casa_jax.sizing", "casa_jax.demo", "casa_jax.demos", "casa_jax.serve")),
)


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in tests/test_layers.py")
    return rank


def module_imports(path: str, module: str) -> list[tuple[int, str]]:
    """(line, imported casa_jax module) for every import statement in the file, at any depth."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("casa_jax")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if not base.startswith("casa_jax"):
                continue
            for a in node.names:  # "from casa_jax.io import hf" imports the module casa_jax.io.hf
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if os.path.exists(_path(sub)) else base))
    return found


def _path(module: str) -> str:
    rel = os.path.join(ROOT, *module.split("."))
    return rel + ".py" if os.path.exists(rel + ".py") else os.path.join(rel, "__init__.py")


def all_modules() -> list[tuple[str, str]]:
    out = []
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out.append((path, rel[:-len(".__init__")] if rel.endswith(".__init__") and rel != "casa_jax.__init__"
                               else rel))
    return sorted(out)


def back_edges() -> list[str]:
    edges = []
    for path, module in all_modules():
        mine = layer_of(module)
        for line, target in module_imports(path, module):
            if layer_of(target) > mine:
                edges.append(f"{os.path.relpath(path, ROOT)}:{line}: {module} ({LAYERS[mine][0]}) imports "
                             f"{target} ({LAYERS[layer_of(target)][0]})")
    return edges


def test_imports_run_one_way():
    edges = back_edges()
    assert not edges, "imports that run back up the layers:\n" + "\n".join(edges)


def test_negative_control_a_back_edge_is_found(tmp_path, monkeypatch):
    """A model module that imports the Engine must be reported."""
    fake = tmp_path / "casa_jax" / "model"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from casa_jax.infer.engine import Engine\n    return Engine\n")
    found = module_imports(str(fake / "bad.py"), "casa_jax.model.bad")
    assert found == [(2, "casa_jax.infer.engine")]
    assert layer_of("casa_jax.infer.engine") > layer_of("casa_jax.model.bad")


# Memoised pure functions of vendored files (no model, no compiled function), allowed on purpose.
PURE_MEMOS = {"casa_jax.data.splits._canonical_ids"}
MUTABLE = ("dict", "list", "set", "OrderedDict", "defaultdict", "WeakValueDictionary", "WeakKeyDictionary")


def module_state(path: str, module: str) -> list[str]:
    """Module-level mutable containers, memoising decorators and ``global`` rebinding: the places a
    loaded model or a compiled function could hide between calls."""
    tree = ast.parse(open(path).read(), path)
    found = []
    for node in tree.body:
        value = getattr(node, "value", None) if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(value, (ast.Dict, ast.List, ast.Set)) and not getattr(value, "keys", getattr(value, "elts", [1])):
            found.append(f"{module}:{node.lineno} empty module-level container")
        if isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] in MUTABLE and not value.args \
                and not value.keywords:
            found.append(f"{module}:{node.lineno} module-level {ast.unparse(value.func)}()")
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.append(f"{module}:{node.lineno} global {', '.join(node.names)}")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in node.decorator_list:
                name = ast.unparse(d)
                if ("lru_cache" in name or name.split("(")[0].endswith("cache")) and \
                        f"{module}.{node.name}" not in PURE_MEMOS:
                    found.append(f"{module}:{node.lineno} @{name} {node.name}")
    return found


def test_no_module_level_model_or_sampler_cache():
    """Loaded models and compiled functions belong to an Engine, not to module globals."""
    offenders = [o for path, module in all_modules() for o in module_state(path, module)]
    assert not offenders, offenders


def test_negative_control_module_cache_is_found(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import functools\n_MODELS = {}\n\n@functools.lru_cache(maxsize=8)\ndef jitted(x):\n"
                   "    return x\n\ndef load():\n    global _MODELS\n")
    assert len(module_state(str(bad), "casa_jax.bad")) == 3


@pytest.mark.parametrize("module", ["casa_jax.model.text_decoder", "casa_jax.infer.engine", "casa_jax.eval.run"])
def test_every_module_has_a_layer(module):
    layer_of(module)
