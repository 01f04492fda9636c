"""The package's structure: each output format's names and defaults live only in the
layouts registry, the import graph has no cycle, and no six lines are written twice."""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

from service.pipelines import layouts

SERVICE = Path(__file__).resolve().parents[1] / "service"
REGISTRY = SERVICE / "pipelines" / "layouts.py"
# Generated protobuf code is not ours to shape.
GENERATED = SERVICE / "_proto"


def sources() -> list[Path]:
    return sorted(p for p in SERVICE.rglob("*.py") if GENERATED not in p.parents)


def string_constants(path: Path) -> list[tuple[int, str]]:
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_tensor_names_are_written_only_in_the_registry():
    names = {t.name for layout in layouts.LAYOUTS.values() for t in layout.outputs + layout.inputs if t.name}
    assert {"boxes__0", "masks__4", "predictions__0", "rois__1", "generated__0"} <= names
    found = [f"{path.relative_to(SERVICE)}:{line}: {value!r}" for path in sources() if path != REGISTRY
             for line, value in string_constants(path) if value in names]
    assert not found, "tensor names outside the layouts registry:\n" + "\n".join(found)


def test_spec_options_are_read_only_through_the_registry():
    """Option keys are parsed once (`ModelSpec.settings`); nobody reads the raw strings
    or restates a default."""
    keys = {o.key for layout in layouts.LAYOUTS.values() for o in layout.options}
    raw_reads = re.compile(r"\.option\(|\boptions\.get\(|\boptions\[")
    found = []
    for path in sources():
        if path == REGISTRY:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if raw_reads.search(line) and any(f'"{key}"' in line for key in keys):
                found.append(f"{path.relative_to(SERVICE)}:{i}: {line.strip()}")
            # A restated default: `"score_threshold": "0.05"` or `DEFAULT_SCORE_THRESHOLD = 0.05`.
            for key in keys:
                if re.search(rf'"{key}"\s*:\s*"', line) or re.search(rf"\bDEFAULT_{key.upper()}\s*=", line):
                    found.append(f"{path.relative_to(SERVICE)}:{i}: {line.strip()}")
    assert not found, "spec options read or defaulted outside the layouts registry:\n" + "\n".join(found)


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The service modules `path` imports (relative imports resolved, `from X import Y`
    counted as X.Y when that is a module)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[:len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {name for name in out if name == "service" or name.startswith("service.")}


def test_the_import_graph_has_no_cycle():
    modules = {module_name(p): p for p in sources()}
    graph = {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}
    # A package's __init__ importing its own submodules (the zoo registering its
    # architectures) is how Python packages are assembled, not a cycle of design.
    for name in graph:
        graph[name] = {m for m in graph[name] if not (m.startswith(name + ".") and modules[name].name == "__init__.py")}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def normalized_lines(path: Path) -> list[tuple[int, str]]:
    """Code lines with their numbers: stripped, without blanks and comment-only lines."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if text and not text.startswith("#"):
            out.append((i, text))
    return out


WINDOW = 6


def test_no_six_lines_are_written_twice():
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for path in sources():
        lines = normalized_lines(path)
        for k in range(len(lines) - WINDOW + 1):
            window = tuple(text for _, text in lines[k:k + WINDOW])
            # Runs of closing brackets and trivial lines are not code worth sharing.
            if sum(len(t) > 12 for t in window) < WINDOW - 1:
                continue
            seen[window].append(f"{path.relative_to(SERVICE)}:{lines[k][0]}")
    clones = {w: places for w, places in seen.items() if len(places) > 1}
    assert not clones, "six-line clones in service/:\n" + "\n".join(
        f"{places}: {w[0]} ..." for w, places in list(clones.items())[:10])


@pytest.mark.parametrize("name", sorted(layouts.LAYOUTS))
def test_every_layout_declares_its_contract(name):
    layout = layouts.LAYOUTS[name]
    assert layout.tasks and layout.outputs and layout.doc
    for option in layout.options:
        # Each default is valid for its own range, and survives the config round trip.
        option.check(option.default)
        assert option.parse(option.text(option.default)) == option.default


def test_a_bad_option_is_reported_one_way():
    yolo = layouts.get("yolov8")
    for options, pattern in (({"score_threshold": "high"}, "score_threshold='high' is not a finite number"),
                             ({"score_threshold": "1.5"}, r"score_threshold=1.5 is outside \[0, 1\]"),
                             ({"max_detections": "0"}, r"max_detections=0 is outside \[1, 1000\]"),
                             ({"class_agnostic": "maybe"}, "class_agnostic='maybe' is not a boolean")):
        with pytest.raises(layouts.BadModelOption, match=pattern):
            yolo.parse_options(options)
    with pytest.raises(layouts.LayoutError, match="unknown output layout 'ssd'"):
        layouts.get("ssd")


def test_no_test_module_imports_another():
    """Shared references live in tests/references.py and tests/helpers.py."""
    tests = Path(__file__).resolve().parent
    found = [f"{path.relative_to(tests)}: {name}" for path in sorted(tests.rglob("*.py"))
             for name in imports_of(path) if name.split(".")[-1].startswith("test_")]
    assert not found, "test modules imported as libraries:\n" + "\n".join(found)


def imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("package, forbidden", [
    ("service.pipelines", ("service.gateway", "service.export", "service.embedded", "service.client")),
    ("service.ops", ("service.gateway", "service.export", "service.pipelines", "service.spec")),
    ("service.gateway", ("service.export", "service.embedded", "service.client")),
    ("service.client", ("service.gateway", "service.export", "service.pipelines")),
])
def test_layers_import_only_downward(package, forbidden):
    """The torch boundary and the request path read from the folders: pipelines and ops
    know nothing of the transport or the torch side, the gateway nothing of export."""
    found = [f"{module_name(p)} -> {m}" for p in sources() if module_name(p).startswith(package)
             for m in imports(p) if m.startswith(forbidden)]
    assert not found, "\n".join(found)
