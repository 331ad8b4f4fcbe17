"""docs/ARCHITECTURE.md §11 is the trace of one upload; this test runs one and fails when the table and the code
disagree.

One real EMS-FL upload in one process: the ground `Outbox` and `Uplink` talk real gRPC over loopback to a real
`SatelliteNode` behind `server.py`, from `Outbox.stage` (what the agent calls with the trainer's state) to the
committed row. A profile hook records every project file whose Python code runs in any thread meanwhile; that set
must be exactly the files the table lists from `outbox.py` on, in the order they are first entered. The two rows
before it (the trainer and the agent's staging step) need torch and a model, so they are checked on the source.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from emsfl.runtime.events import EventLog, read_events
from ground_node.federation.outbox import Outbox
from ground_node.federation.uplink import Uplink
from ground_node.records import Affinity
from satellite_node.manifest import load_manifest
from satellite_node.node import NodeConfig, SatelliteNode
from satellite_node.server import make_server
from satellite_node.store import Store
from satellite_node.testing import FakeLinks, expert_update, write_tiny_base
from tests.test_architecture import _cycles

ROOT = Path(__file__).resolve().parents[1]
# The test's link fake; in a run `emsfl/runtime/linkview.py` answers the same `LinkState` calls, reading the time
# from the emulated clock (`emsfl/runtime/clock.py`), which the fake does not have.
FAKES = {"satellite_node/testing.py": "emsfl/runtime/linkview.py"}
RUN_ONLY = {"emsfl/runtime/clock.py"}
ROW = re.compile(r"^\| *(\d+) *\| *`([^`]+)` *\| *(hop|consulted) *\|")


def documented() -> list[tuple[str, str]]:
    """(file, role) of the rows of §11's table, in order."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## 11. Tracing one upload", 1)[1].split("\n## ", 1)[0]
    rows = [m.groups() for m in map(ROW.match, section.splitlines()) if m is not None]
    assert [int(n) for n, _, _ in rows] == list(range(1, len(rows) + 1)), "rows numbered 1, 2, ..."
    return [(path, role) for _, path, role in rows]


def own_file(frame: FrameType) -> str | None:
    """The hand-written project file `frame` runs code of, if it is one (not the test, not a generated stub)."""
    path = Path(frame.f_code.co_filename)
    if not path.is_absolute() or ROOT not in path.parents:
        return None
    rel = path.relative_to(ROOT).as_posix()
    # `make test` puts the virtual environment inside the checkout: installed packages are not the project's
    if rel.startswith(("tests/", ".")) or "_pb2" in rel or "site-packages/" in rel:
        return None
    return FAKES.get(rel, rel)


def calling_file(frame: FrameType | None) -> str | None:
    """The project file of the nearest frame from `frame` up (library frames in between are skipped)."""
    while frame is not None:
        found = own_file(frame)
        if found is not None:
            return found
        frame = frame.f_back
    return None


# A generator's data flows to whoever pulls from it: resuming one is not a call from the puller.
GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


class FileRecorder:
    """While `on`, in every thread: the project files whose Python functions are entered, in first-entered order,
    and the calls from one file into another (caller, callee)."""

    def __init__(self) -> None:
        self.on = False
        self.files: list[str] = []
        self.calls: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or not self.on:
            return
        callee = own_file(frame)
        if callee is None:
            return
        caller = None if frame.f_code.co_flags & GENERATOR_FLAGS else calling_file(frame.f_back)
        with self._lock:
            if callee not in self.files:
                self.files.append(callee)
            if caller is not None and caller != callee:
                self.calls.add((caller, callee))


def trace_one_upload(tmp: Path) -> FileRecorder:
    recorder = FileRecorder()
    threading.setprofile(recorder)  # threads started from here on: the server's workers, the chunk sink's writer
    sys.setprofile(recorder)
    try:
        base = write_tiny_base(tmp / "base")
        links = FakeLinks()
        manifest, config = load_manifest(base), NodeConfig({"c0": 8})
        node_events = EventLog(tmp / "satellite.jsonl", "satellite", "satellite", links.emulated_now)
        node = SatelliteNode(Store(tmp / "state"), manifest, str(base), config, links, node_events)
        server, port = make_server(node, "127.0.0.1:0")
        server.start()
        outbox = Outbox(tmp / "outbox")
        affinity = Affinity(np.full((2, 4), 0.25, np.float32), np.full((2, 4), 0.25, np.float32), 100)
        ground_events = EventLog(tmp / "ground.jsonl", "ground", "c0", links.emulated_now)
        uplink = Uplink(f"127.0.0.1:{port}", "c0", links, outbox, 8, 10, affinity, events=ground_events)
        try:
            assert uplink.run_pass() is False  # join, affinity, assignment; nothing staged yet
            assert uplink.assignment is not None
            state = expert_update(base, uplink.assignment.pairs())  # what `Trainer.expert_state` hands over
            recorder.on = True
            update = outbox.stage(state, uplink.assignment.version, 10)
            uplink.run_pass()
            recorder.on = False
            assert outbox.acked() == [update.content_hash]
            assert [c["content_hash"] for c in node.store.commits()] == [update.content_hash]
            acked = [e for e in read_events(tmp / "ground.jsonl") if e["event"] == "upload_acked"]
            assert [e["content_hash"] for e in acked] == [update.content_hash]
        finally:
            uplink.client.close()
            server.stop(0)
            node.store.close()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    return recorder


def test_the_documented_trace_is_the_one_an_upload_takes(tmp_path: Path) -> None:
    rows = documented()
    files = [f for f, _ in rows]
    assert len(set(files)) == len(files), "each file once, at its first step"
    assert files[:3] == ["ground_node/learning/train.py", "ground_node/agent.py", "ground_node/federation/outbox.py"]
    recorder = trace_one_upload(tmp_path)
    traced = recorder.files
    missing = [f for f in traced if f not in files]
    assert not missing, f"the upload runs code in files §11 does not name: {missing}"
    unused = [f for f in files[2:] if f not in traced and f not in RUN_ONLY]
    assert not unused, f"§11 names files the upload never enters: {unused}"
    assert traced == [f for f in files[2:] if f not in RUN_ONLY], "§11 lists the files in the order first entered"
    graph: dict[str, set[str]] = {f: set() for f in traced}
    for caller, callee in recorder.calls:
        graph[caller].add(callee)
    assert not _cycles(graph), f"the upload's calls between files go back and forth: {_cycles(graph)}"


def test_the_agent_stages_what_the_trainer_hands_over() -> None:
    """Rows 1 and 2: `GroundAgent._stage` passes `Trainer.expert_state()` to `Outbox.stage`, nothing in between."""
    tree = ast.parse((ROOT / "ground_node" / "agent.py").read_text(encoding="utf-8"))
    (stage,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_stage"]
    calls = [ast.unparse(n) for n in ast.walk(stage) if isinstance(n, ast.Call)]
    assert any(c.startswith("self.outbox.stage(trainer.expert_state()") for c in calls), calls
    train = ast.parse((ROOT / "ground_node" / "learning" / "train.py").read_text(encoding="utf-8"))
    assert any(isinstance(n, ast.FunctionDef) and n.name == "expert_state" for n in ast.walk(train))
