"""Dependencies point one way: schedules -> distributions -> elbo/objectives/sampling -> markov ->
cli. ``nets`` and ``data`` use only torch/numpy (and scipy/sklearn for data), and ``files`` (atomic
writes) for data; ``files`` itself imports no pdiff module; nothing in pdiff imports
``experiments``."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pdiff"

# For each module (or subpackage), the pdiff modules it may import.
LAYERS = {
    "schedules": set(),
    "parameterization": {"schedules"},
    "distributions": {"schedules", "parameterization", "distributions"},
    "elbo": {"schedules", "parameterization", "distributions"},
    "objectives": {"schedules", "parameterization", "distributions", "elbo", "weighting",
                   "continuous"},
    # continuous time: the schedule at real u, the denoiser there, the VDM bound
    "continuous": {"schedules", "parameterization", "distributions", "elbo", "nets"},
    "ode": {"schedules", "parameterization", "distributions", "elbo", "continuous", "nets"},
    "weighting": {"schedules", "files"},  # pure functions of the schedule (and one figure)
    "sampling": {"schedules", "parameterization", "distributions"},
    "oracle": {"schedules", "data"},
    "markov": {"schedules", "parameterization", "distributions", "elbo"},
    "nets": {"nets"},
    "data": {"data", "files"},
    "files": set(),  # atomic writes: the standard library (and torch.save)
    "evaluation": {"schedules", "parameterization", "distributions", "elbo", "distributed",
                   "resources", "continuous", "ode"},
    "resources": set(),  # what the machine has (memory): the standard library
    "checkpoint": {"files"},
    "rundir": {"files"},
    "workers": {"runtime"},
    "metrics": set(),
    "distributed": set(),  # torch.distributed helpers: torch only
    # sample quality: the classifier's features (feature_net trains and caches it), the metrics
    "feature_net": {"checkpoint", "data", "files", "nets"},
    "sample_quality": set(),
    "figures": {"schedules", "parameterization", "distributions", "sampling", "files",
                "continuous"},
}


def pdiff_imports(path: Path) -> set[str]:
    """The top-level pdiff modules a file imports (relative imports resolved)."""
    rel = path.relative_to(PKG.parent).with_suffix("").parts  # ("pdiff", "distributions", "forward")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[: len(rel) - node.level])
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts] if node.module else [parts + [a.name] for a in node.names]
            else:
                names = [node.module.split(".")]
            for parts in names:
                if parts[0] == "pdiff" and len(parts) > 1:
                    found.add(parts[1])
                if parts[0] == "experiments":
                    found.add("experiments")
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "pdiff" and len(parts) > 1:
                    found.add(parts[1])
                if parts[0] == "experiments":
                    found.add("experiments")
    return found


def module_files():
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG).with_suffix("").parts
        if parts[0] != "__init__":
            yield parts[0], path


@pytest.mark.parametrize("layer, path", list(module_files()), ids=lambda v: str(v))
def test_dependencies_point_one_way(layer, path):
    imports = pdiff_imports(path) - {layer}
    assert "experiments" not in imports, f"{path} imports experiments/"
    if layer in LAYERS:
        extra = imports - LAYERS[layer]
        assert not extra, f"{path.relative_to(PKG.parent)} ({layer}) may not import {sorted(extra)}"
