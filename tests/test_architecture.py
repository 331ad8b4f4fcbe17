"""The house rules of docs/ARCHITECTURE.md §2, checked on the source: no import cycle, no oversized module,
no role importing another, and no reference to a design file outside the repository."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("emsfl", "ground_node", "satellite_node", "orbit_service", "protos", "testbed")
ROLES = ("ground_node", "satellite_node", "orbit_service")
MAX_LINES = 600

# Known debts (docs/ARCHITECTURE.md §2): these lists may only shrink. A fixed entry must be removed here.
KNOWN_CYCLES: set[frozenset[str]] = set()
KNOWN_LONG_MODULES: set[str] = set()


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "_pb2" in path.name:
                continue  # generated gRPC stubs
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in the file (a lazy import inside a function is still an edge)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        out.update(name for name in names if name in modules)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            advanced = False
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [frozenset({"a", "b", "c"})]


def test_no_new_import_cycle() -> None:
    cycles = set(_cycles(_graph()))
    new = cycles - KNOWN_CYCLES
    assert not new, f"import cycles: {[sorted(c) for c in new]}"
    fixed = KNOWN_CYCLES - cycles
    assert not fixed, f"fixed cycles still listed in KNOWN_CYCLES, remove them: {[sorted(c) for c in fixed]}"


def test_roles_never_import_one_another() -> None:
    for name, imported in _graph().items():
        role = name.split(".")[0]
        if role not in ROLES:
            continue
        foreign = {m for m in imported if m.split(".")[0] in ROLES and m.split(".")[0] != role}
        assert not foreign, f"{name} imports another role: {sorted(foreign)}"


def test_protos_holds_only_contracts() -> None:
    """protos/ is the proto and its stubs, the MQTT schemas and topics, the chunk wire format; runtime helpers
    (bus, clock, link view, events, window, gRPC client) live in emsfl/runtime/ (ARCHITECTURE §2)."""
    contracts = {"protos", "protos.payloads", "protos.topics", "protos.wire", "protos.generate"}
    stubs = {"protos.emsfl", "protos.emsfl.v1"}
    found = {name for name in _modules() if name.startswith("protos")}
    assert found <= contracts | stubs, f"not a contract, move it to emsfl/runtime/: {sorted(found - contracts - stubs)}"


def test_shared_runtime_imports_no_role() -> None:
    """emsfl/runtime/ is shared by every role: it may use protos/ and emsfl/, never a role or the testbed."""
    assert (ROOT / "emsfl" / "runtime" / "__init__.py").read_text(encoding="utf-8") == "", "keep the import cheap"
    for name, imported in _graph().items():
        if name.startswith("emsfl.runtime"):
            foreign = {m for m in imported if m.split(".")[0] in (*ROLES, "testbed")}
            assert not foreign, f"{name} imports a role: {sorted(foreign)}"


def test_every_link_implements_the_link_protocol() -> None:
    """The link is one typed protocol (emsfl/runtime/linkstate.py): the real view and every test fake subclass
    `LinkState` explicitly and define all its methods, so nobody probes a link with getattr."""
    protocol = ast.parse((ROOT / "emsfl" / "runtime" / "linkstate.py").read_text(encoding="utf-8"))
    members = {
        f.name
        for c in ast.walk(protocol)
        if isinstance(c, ast.ClassDef) and c.name == "LinkState"
        for f in c.body
        if isinstance(f, ast.FunctionDef)
    }
    assert {"is_up", "emulated_now", "link"} <= members
    links = 0
    for package in (*PACKAGES, "tests", "benchmarks"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.ClassDef) or node.name == "LinkState":
                    continue
                methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
                if "is_up" not in methods:
                    continue
                links += 1
                where = f"{path.relative_to(ROOT)}:{node.name}"
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                assert "LinkState" in bases, f"{where} has is_up but does not subclass LinkState"
                assert members <= methods, f"{where} lacks LinkState methods {sorted(members - methods)}"
    assert links >= 2  # the real view and at least one fake
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
                target = node.args[0]
                label = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
                assert label not in {"link", "links", "view", "pacer"}, f"{name} probes a link with getattr"


def test_no_hand_written_module_over_600_lines() -> None:
    long = {
        str(path.relative_to(ROOT))
        for path in _modules().values()
        if len(path.read_text(encoding="utf-8").splitlines()) > MAX_LINES
    }
    assert long <= KNOWN_LONG_MODULES, f"modules over {MAX_LINES} lines: {sorted(long - KNOWN_LONG_MODULES)}"
    fixed = KNOWN_LONG_MODULES - long
    assert not fixed, f"no longer over {MAX_LINES} lines, remove from KNOWN_LONG_MODULES: {sorted(fixed)}"


def test_design_references_point_into_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for rel in tracked:
        if not rel.endswith((".py", ".md", ".yaml", ".yml", ".j2", ".toml")) or rel == "tests/test_architecture.py":
            continue
        text = (ROOT / rel).read_text(encoding="utf-8", errors="replace")
        if "DESIGN §" in text or "DESIGN.md" in text or "DESIGN-DELTAS" in text:
            offenders.append(rel)
    assert not offenders, f"references to a design file outside the repository (use ARCHITECTURE §): {offenders}"


def test_satellite_node_never_names_a_strategy() -> None:
    """The node facade, the upload service, admission and the adapter reach a strategy only through the `Strategy`
    interface the topology's name selects (`make_strategy`): no strategy's name, no concrete strategy class."""
    from satellite_node.strategy import STRATEGIES

    names = set(STRATEGIES)
    classes = {cls.__name__ for cls in STRATEGIES.values()}
    for module in ("node", "uploads", "admission", "context", "server"):
        tree = ast.parse((ROOT / "satellite_node" / f"{module}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in names, f"satellite_node/{module}.py names strategy {node.value!r}"
            label = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
            assert label not in classes, f"satellite_node/{module}.py names {label}"


def test_satellite_core_is_free_of_grpc() -> None:
    """Refusals are plain kinds; only the adapter (`server.py`) maps them to gRPC status codes."""
    core = ("node", "uploads", "admission", "context", "strategy", "validate", "assignment", "manifest", "store")
    for name, path in _modules().items():
        if name.startswith("satellite_node.") and name.split(".")[1] in core:
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    assert all(a.name.split(".")[0] != "grpc" for a in node.names), f"{name} imports grpc"
                elif isinstance(node, ast.ImportFrom) and node.module:
                    assert node.module.split(".")[0] != "grpc", f"{name} imports grpc"
