"""The link shaper on real traffic: two network namespaces joined by a veth pair (10.213.77.0/30, only there).

The orbit side runs in-process (a plan with no pass; the link is forced up or down by override). The shaper
runs as `emsfl orbit shaper` and shapes the egress of the veth end in namespace A, so the TCP connect time
from A to B (one round trip) carries the published one-way delay once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from emsfl.runtime.bus import Bus
from emsfl.runtime.clock import EmulatedClock
from orbit_service.link import LinkModel
from orbit_service.plan import Plan
from orbit_service.publisher import OrbitPublisher
from orbit_service.shaper import netem_args
from protos import topics
from testbed.broker import BrokerProcess

REPO = Path(__file__).resolve().parents[2]
START = datetime(2026, 3, 20, 6, 0, tzinfo=timezone.utc)
ADDR_A, ADDR_B = "10.213.77.1", "10.213.77.2"
PORT = 7777


def _sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


@pytest.fixture
def netns_pair() -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:6]
    a, b = f"emsfl-a-{tag}", f"emsfl-b-{tag}"
    created = _sh("ip", "netns", "add", a).returncode == 0 and _sh("ip", "netns", "add", b).returncode == 0
    if not created:
        _sh("ip", "netns", "del", a)
        reason = "cannot create network namespaces (needs root, CAP_SYS_ADMIN and iproute2)"
        if os.environ.get("CI") == "true" and os.geteuid() == 0:
            pytest.fail(f"CI=true and root, but {reason}")
        pytest.skip(reason)
    try:
        steps = [
            ("ip", "link", "add", f"va{tag}", "netns", a, "type", "veth", "peer", "name", f"vb{tag}", "netns", b),
            ("ip", "-n", a, "addr", "add", f"{ADDR_A}/30", "dev", f"va{tag}"),
            ("ip", "-n", b, "addr", "add", f"{ADDR_B}/30", "dev", f"vb{tag}"),
            ("ip", "-n", a, "link", "set", f"va{tag}", "up"),
            ("ip", "-n", b, "link", "set", f"vb{tag}", "up"),
            ("ip", "-n", a, "link", "set", "lo", "up"),
            ("ip", "-n", b, "link", "set", "lo", "up"),
        ]
        for step in steps:
            r = _sh(*step)
            assert r.returncode == 0, f"{' '.join(step)}: {r.stderr}"
        yield a, b
    finally:
        _sh("ip", "netns", "del", a)
        _sh("ip", "netns", "del", b)


SERVER = "import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
SERVER += f"s.bind(('{ADDR_B}',{PORT}));s.listen(64);print('ready',flush=True)\n"
SERVER += "while True:\n c,_=s.accept();c.close()\n"

PROBE = f"""
import socket,sys,time
out=[]
for _ in range(int(sys.argv[1])):
    s=socket.socket();s.settimeout(float(sys.argv[2]))
    t=time.perf_counter()
    try:
        s.connect(('{ADDR_B}',{PORT}));out.append(time.perf_counter()-t)
    except OSError:
        out.append(-1.0)
    s.close();time.sleep(0.05)
print(' '.join(f'{{x:.6f}}' for x in out))
"""


def _probe(ns: str, n: int = 5, timeout: float = 1.0) -> list[float]:
    r = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, str(n), str(timeout)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [float(x) for x in r.stdout.split()]


def test_netem_arguments() -> None:
    assert netem_args(None) == ["netem", "loss", "100%"]
    up = {"state": "up", "delay_s": 0.005, "rate_bps": 1e6, "loss": 0.01}
    assert netem_args(up) == ["netem", "delay", "5000us", "loss", "1.0000%", "rate", "1000000bit"]


def _wait(pred: object, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def _qdisc(ns: str, dev: str) -> str:
    return _sh("ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev).stdout


def _has_netem(ns: str, dev: str) -> bool:
    ok = (
        _sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", "1ms").returncode
        == 0
    )
    _sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root")
    return ok


def _dropping(text: str) -> bool:
    return "loss 100%" in text or ("pfifo" in text and "limit 0" in text.replace("limit 0p", "limit 0"))


def test_shaper_enforces_delay_while_up_and_drops_while_down(
    broker: BrokerProcess, netns_pair: tuple[str, str], tmp_path: Path
) -> None:
    a, b = netns_pair
    dev = "va" + a.rsplit("-", 1)[1]
    netem = _has_netem(a, dev)
    server = subprocess.Popen(
        ["ip", "netns", "exec", b, sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True
    )
    bus = Bus(broker.host, broker.port, role="orbit", node_id="orbit", status_topic=topics.ORBIT_STATUS)
    plan = Plan(START, START + timedelta(hours=1), 1.0, {}, {})
    plan.windows = {"c0": []}
    pub = OrbitPublisher(plan, bus, EmulatedClock(START, time.time(), 1.0), LinkModel(), 3)
    log = open(tmp_path / "shaper.log", "w")  # noqa: SIM115
    shaper = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emsfl",
            "orbit",
            "shaper",
            "--cluster",
            "c0",
            "--broker",
            f"{broker.host}:{broker.port}",
            "--dev",
            dev,
            "--netns",
            a,
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        bus.start()
        pub.start()
        assert _wait(lambda: _dropping(_qdisc(a, dev)), 20), (tmp_path / "shaper.log").read_text()
        assert all(x < 0 for x in _probe(a, 2, 0.5)), "traffic passed while the link is down"
        delay_s = 0.05
        pub.force("c0", "up", None, delay_s=delay_s, rate_bps=1e8)
        assert _wait(lambda: not _dropping(_qdisc(a, dev)), 10), _qdisc(a, dev)
        rtts = _probe(a, 5)
        assert all(x > 0 for x in rtts), f"traffic blocked while the link is up: {rtts}"
        median = sorted(rtts)[len(rtts) // 2]
        if netem:
            assert "delay 50" in _qdisc(a, dev)
            assert median == pytest.approx(delay_s, rel=0.2), rtts
        pub.force("c0", "down", None)
        assert _wait(lambda: _dropping(_qdisc(a, dev)), 10)
        assert all(x < 0 for x in _probe(a, 2, 0.5)), "traffic passed while the link is down"
    finally:
        shaper.terminate()
        assert shaper.wait(15) == 0
        log.close()
        pub.stop()
        bus.stop()
        server.kill()
        server.wait()
    assert "netem" not in _qdisc(a, dev) and not _dropping(_qdisc(a, dev))  # removed on exit
    if not netem:
        pytest.skip(
            "up/down enforcement verified; the delay check needs tc netem, and this kernel has no sch_netem "
            "(CONFIG_NET_SCH_NETEM): 'Specified qdisc kind is unknown'"
        )
