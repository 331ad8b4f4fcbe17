"""No tracked file names a path of one particular machine (a developer's home, a checkout, a shared folder).

Data comes from the topology (relative to the repository root) or from `$EMSFL_DATA_DIR` (emsfl/datadir.py).
System paths (/usr, /etc, /opt/emsfl where a deployed node keeps its files, ...), web routes and paths inside
the project's containers are fine; paths under the roots where machines keep homes, checkouts and shared
folders are not, but for the documented exceptions below.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from emsfl.datadir import DATA_DIR_ENV, REPO_ROOT, data_root

# An absolute path: a slash at a token boundary, a first component, and at least one more component.
ABSOLUTE = re.compile(r"(?:^|(?<=[\s\"'`(=,\[{>|;]))(/[A-Za-z_][\w.@+-]*(?:/[\w.@+{}*$-]+)+)")
# First components under which machines keep homes, checkouts and shared folders (Linux, macOS, CI runners).
# Other absolute-looking strings are web routes (/api/stream) or gRPC methods, not files.
MACHINE_ROOTS = {
    "home",
    "Users",
    "root",
    "work",
    "workspace",
    "workspaces",
    "mnt",
    "media",
    "tmp",
    "scratch",
    "data",
    "shared",
    "private",
    "Volumes",
    "nfs",
    "gpfs",
    "lustre",
    "builds",
    "runner",
    "content",
    "kaggle",
}

# Under those roots, documented exceptions: the throwaway SSH user's home that tests/deploy creates on the test host.
DOCUMENTED = ("/home/{user}",)
SCRATCH_ON_TARGET = ("deploy/",)  # /tmp there is the provisioned host's scratch space


def _allowed(path: str, file: str) -> bool:
    if path.split("/")[1] not in MACHINE_ROOTS:  # a system path, a route or an RPC method
        return True
    if path.startswith("/tmp/") and file.startswith(SCRATCH_ON_TARGET):
        return True
    return path.startswith(DOCUMENTED)


def machine_paths(text: str, file: str) -> list[str]:
    return [m.group(1) for m in ABSOLUTE.finditer(text) if not _allowed(m.group(1), file)]


def test_no_tracked_file_holds_a_path_of_one_machine() -> None:
    files = (
        subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    assert len(files) > 100  # really scanned the repository
    found = []
    for name in filter(None, files):
        path = REPO_ROOT / name
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (figures)
        found += [f"{name}: {p}" for p in machine_paths(text, name)]
    assert not found, "absolute paths outside the repository:\n" + "\n".join(found)


def test_the_scanner_catches_what_it_is_for() -> None:
    slash = "/"  # the examples are assembled, so that this file does not hold them itself
    dev = f"{slash}work/shared/data/banking77"
    assert machine_paths(f'BANKING = Path("{dev}")', "tests/x.py") == [dev]
    home = f"{slash}home/ana/emsfl/t.yaml"
    assert machine_paths(f"topology: {home}", "README.md") == [home]
    tmp = f"{slash}tmp/s3/exp/local.yaml"
    assert machine_paths(f'"topology": "{tmp}"', "benchmarks/r.json") == [tmp]
    assert machine_paths(f"topology: {tmp}", "deploy/x.yml") == []  # the target host's scratch
    assert machine_paths("see https://example.org/a/b and runs/<id>/x.json", "README.md") == []
    assert machine_paths("ExecStart=/opt/emsfl/bin/emsfl-ground", "deploy/x.j2") == []


def test_the_data_root_is_the_environment_variable_or_next_to_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert data_root() == (REPO_ROOT / ".." / "shared" / "data").resolve()
    monkeypatch.setenv(DATA_DIR_ENV, "/srv/datasets")
    assert data_root() == Path("/srv/datasets")
