"""The package's imports, lazy (function-level) ones included, follow its layer order (LAYERS): a module
imports only modules below it, so each can be read, tested and changed with only what is below it in
mind; in particular there are no cycles. docs/ARCHITECTURE.md describes the layers."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pocl_ray"

# Every module of pocl_ray, bottom first: a module may import only modules listed before it. A new
# module goes above everything it imports; a renamed one keeps its place under its new name. A package
# is listed above its own modules (its __init__ may import them): importing `pkg.mod` from outside the
# package also runs `pkg`.
LAYERS = [
    # Foundations: the config, then plain Python / pyarrow / numpy on it (files on a disk or a bucket, rows,
    # conversations, datasets by name, ranks and buckets, the probe rows, a worker's shard reader, an epoch
    # re-dealt to another worker count)
    "config",
    "seeds",
    "logprobs",
    "storage",
    "scores",
    "conversations",
    "hf_datasets",
    "data",
    "difficulty",
    "probes",
    "shards",
    "elastic",
    # Plain torch / numpy on the foundations: where a model comes from, models, FSDP2
    # sharding and its checkpoints, plans, generation, projections; the driver's preflight of every input
    "model_source",
    "models",
    "sharding",
    "sharded_checkpoint",
    "curriculum",
    "sampling",
    "extraction",
    "preflight",
    # The cached teacher, then the losses (which read it)
    "teacher_cache",
    "losses",
    # Ray glue shared by the Ray stages (start or join Ray, actor pools; progress lines); the resumable
    # pipeline steps; results.json; the curriculum coordinator actor
    "ray_session",
    "progress",
    "pipeline_steps",
    "eval_results",
    # Experiment trackers: what is logged (plain mappings), the run tree across processes
    "tracked",
    "tracking",
    "coordinator",
    # `score`: the difficulty measurers, the scoring pass
    "measurers",
    "scoring",
    # `eval` (its greedy decoding also serves training's checkpoint selection)
    "evaluation",
    # `train`: the teacher interface, the step, the worker, the driver
    "training.teacher",
    "training.step",
    "training.worker",
    "training.driver",
    "training",
    # Everything over the Ray stages
    "teacher_prep",
    "tuning",
    "report",
    "pipeline",
    # The sparse-parity sandbox: its config, the pure sandbox, the Ray runner
    "parity.config",
    "parity.sandbox",
    "parity.runner",
    "parity",
    "cli",
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _parents(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_graph() -> dict[str, set[str]]:
    """module -> the pocl_ray modules it imports anywhere in its source (inside functions too), and the
    packages of those outside its own package (importing `pkg.mod` runs `pkg` first)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1 packages
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from pocl_ray import data` imports the module pocl_ray.data, not the package.
                targets |= {f"{base}.{alias.name}" for alias in node.names} | {base}
        targets |= {p for t in targets if t in modules for p in _parents(t) if not name.startswith(p + ".")}
        graph[name] = {t for t in targets if t in modules and t != name and t != "pocl_ray"}
    return graph


def upward_imports(graph: dict[str, set[str]], order: list[str]) -> list[str]:
    """ "a imports b" for every import of a module not listed before the importer in ``order``."""
    rank = {m: i for i, m in enumerate(order)}
    return sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets if rank[t] >= rank[m])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with an explicit path)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            cycle = visit(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    return next((c for c in (visit(n, []) for n in sorted(graph)) if c), None)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_among_package_modules():
    graph = import_graph()
    assert {"pocl_ray.pipeline", "pocl_ray.report", "pocl_ray.tuning", "pocl_ray.pipeline_steps"} <= set(graph)
    assert "pocl_ray.pipeline_steps" in graph["pocl_ray.pipeline"]  # the graph sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_imports():
    names = sorted(import_graph())
    assert len(names) > 15  # the graph found the package's modules
    for name in names:
        assert importlib.import_module(name).__name__ == name


def test_upward_imports_finds_imports_of_modules_above_or_beside():
    graph = {"a": set(), "b": {"a"}, "c": {"b", "d"}, "d": {"a", "d"}}
    assert upward_imports(graph, ["a", "b", "c", "d"]) == ["c imports d", "d imports d"]
    assert upward_imports({"a": set(), "b": {"a"}}, ["a", "b"]) == []


def test_import_graph_counts_lazy_relative_and_package_imports():
    graph = import_graph()
    assert "pocl_ray.training.driver" in graph["pocl_ray.cli"]  # a lazy import, inside a function
    assert "pocl_ray.training" in graph["pocl_ray.cli"]  # its package runs first
    assert "pocl_ray.training" not in graph["pocl_ray.training.step"]  # its own package is already running


def test_modules_import_only_modules_below_them():
    graph = import_graph()
    names = [f"pocl_ray.{m}" for m in LAYERS]
    assert len(set(names)) == len(names), "a module is listed twice in LAYERS"
    assert set(names) == set(graph) - {"pocl_ray"}, (
        f"LAYERS must list every module: missing {sorted(set(graph) - set(names) - {'pocl_ray'})}, "
        f"not in the package {sorted(set(names) - set(graph))}"
    )
    upward = upward_imports({m: t - {"pocl_ray"} for m, t in graph.items() if m != "pocl_ray"}, names)
    assert not upward, "imports upward in the layer order (tests/test_imports.py LAYERS):\n" + "\n".join(upward)
