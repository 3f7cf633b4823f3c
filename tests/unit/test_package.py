"""The package's public surface and the direction of its imports."""
from __future__ import annotations

import ast
from pathlib import Path

import tuneforge

SRC = Path(tuneforge.__file__).parent


def test_public_train_is_the_function_even_after_the_engine_is_imported(tiny_models, chat_file, tmp_path):
    from tests.conftest import tiny_spec
    import tuneforge.training.recipe  # noqa: F401  (importing a subpackage sets an attribute on the package)

    for run in ("a", "b"):
        summary = tuneforge.train(tiny_spec(tiny_models["llama"], chat_file, tmp_path / run, max_steps=1), progress=False)
        assert summary.status == "succeeded"


def _imports(path: Path) -> set[str]:
    """tuneforge modules imported anywhere in `path` (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tuneforge"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tuneforge"))
    return found


def _module(path: Path) -> str:
    return ".".join(("tuneforge", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")


def test_imports_flow_one_way():
    """Layers, lowest first. A module may import its own layer and those below, never one above;
    `api` (the facade) is imported only by the service and the entry points (cli, demo, the package's lazy
    exports)."""
    layers = [
        {"errors", "files", "hardware", "process"},
        {"spec", "data", "models", "methods", "distributed"},
        {"training", "inference"},
        {"evaluation", "export", "planning"},
        {"serving"},  # serves PyTorch runs and ONNX exports (export.onnx's runner)
        {"api"},
        {"service"},
        {"cli", "demo", "demo_data", "__init__"},
    ]
    rank = {name: i for i, layer in enumerate(layers) for name in layer}
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        mod = _module(path)
        part = mod.split(".")[1] if mod != "tuneforge" else "__init__"
        for imported in _imports(path):
            bits = imported.split(".")
            if len(bits) < 2 or bits[1] not in rank:
                continue
            if rank[bits[1]] > rank[part]:
                problems.append(f"{mod} imports {imported}")
    assert problems == []


def _started_modules(path: Path) -> set[str]:
    """tuneforge modules `path` starts as a process: string constants naming one (`-m tuneforge.cli`, or a
    command list's "tuneforge.cli" item)."""
    found = set()
    tree = ast.parse(path.read_text())
    prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:  # not docstrings
            for word in node.value.replace("=", " ").split():
                if word.startswith("tuneforge.") and word.replace(".", "").replace("_", "").isalnum():
                    found.add(word)
    return found


def test_no_module_below_the_cli_starts_the_cli_or_a_higher_layer():
    """Starting a module as a process is an import the import statements do not show: a lower layer that starts
    the CLI (or the service) depends on it all the same. Processes are started through their own entry modules
    (training/entry.py, the service's worker and runner), each in its layer."""
    layers = ["errors files hardware process", "spec data models methods distributed", "training inference",
              "evaluation export planning", "serving", "api", "service", "cli demo demo_data __init__"]
    rank = {name: i for i, layer in enumerate(layers) for name in layer.split()}
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        mod = _module(path)
        part = mod.split(".")[1] if mod != "tuneforge" else "__init__"
        for started in _started_modules(path):
            bits = started.split(".")
            if len(bits) >= 2 and bits[1] in rank and rank[bits[1]] > rank[part]:
                problems.append(f"{mod} starts {started}")
            if started == "tuneforge.cli" and part != "cli":
                problems.append(f"{mod} starts the CLI")
    assert problems == []


def test_the_process_check_sees_a_lower_layer_starting_the_cli(tmp_path):
    """The check above, on a module written the way api.py once started the ranks."""
    module = tmp_path / "x.py"
    module.write_text('import subprocess, sys\ncommand = [sys.executable, "-m", "tuneforge.cli", "train", "job.yaml"]\n')
    assert _started_modules(module) == {"tuneforge.cli"}
    module.write_text('CODE = "from tuneforge.planning.probe import _child; _child()"\n')
    assert "tuneforge.planning.probe" in _started_modules(module)


def test_the_cli_and_the_python_api_import_no_torch_until_they_need_it():
    """`tuneforge train missing.yaml` answers in under a second: the CLI, the Python API and the spec load
    without torch (1-2 s of imports); training, generating and serving import it where they start."""
    import subprocess
    import sys

    code = ("import sys, tuneforge, tuneforge.api, tuneforge.cli, tuneforge.spec, tuneforge.service.app; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
