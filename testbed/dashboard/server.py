"""The dashboard's web server (aiohttp): the page, its snapshot, a Server-Sent Events stream of deltas, and
operator commands forwarded to the orbit service's command topic (only with `--operator` and its token).

Every response carries a strict Content-Security-Policy: the page may load and connect to its own origin only,
and the browser reports any violation to `/api/csp-report` (kept, and shown by `/api/csp-reports`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from emsfl.runtime.tls import TlsFiles
from protos import payloads
from testbed.dashboard.sources import MqttSource, RunFiles, SatelliteState
from testbed.dashboard.state import DashboardState, Delta, sse_frame

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "font-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "report-uri /api/csp-report"
)
TOKEN_HEADER = "X-Emsfl-Token"
FILE_POLL_S = 0.5
SATELLITE_POLL_S = 1.0
QUEUE_LIMIT = 2000  # deltas a slow page may lag behind before it is cut off (EventSource reconnects)
VERBS = ("link", "pause", "resume", "scale")
COMMAND_TIMEOUT_S = 10.0
KEY_STATE: web.AppKey[Dashboard] = web.AppKey("dashboard")


@dataclass
class DashboardOptions:
    broker_host: str
    broker_port: int
    state_dir: Path | None = None
    run_dir: Path | None = None
    operator_token: str | None = None  # None: read-only
    allowed_hosts: frozenset[str] = frozenset()  # Host headers served (empty: any); loopback: DNS rebinding guard
    tls: TlsFiles | None = None  # the MQTT session's certificate (a TLS broker)


class Dashboard:
    """The state, its sources and the open pages' queues; everything runs on one asyncio loop."""

    def __init__(self, opts: DashboardOptions) -> None:
        self.opts = opts
        self.state = DashboardState(operator=opts.operator_token is not None)
        self.queues: set[asyncio.Queue[bytes | None]] = set()
        self.csp_reports: list[Any] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.mqtt = MqttSource(opts.broker_host, opts.broker_port, self._from_mqtt_thread, opts.tls)
        self.files = RunFiles(opts.run_dir, opts.state_dir)
        self.satellite = SatelliteState(opts.state_dir) if opts.state_dir is not None else None
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self, app: web.Application) -> None:
        self._loop = asyncio.get_running_loop()
        self.mqtt.start()
        self._tasks = [asyncio.create_task(self._poll_files())]
        if self.satellite is not None:
            self._tasks.append(asyncio.create_task(self._poll_satellite()))

    async def stop(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        for queue in list(self.queues):
            queue.put_nowait(None)
        self.mqtt.stop()
        if self.satellite is not None:
            self.satellite.close()

    # -- sources --------------------------------------------------------------------------------------------
    def _from_mqtt_thread(self, topic: str, data: bytes, wall: float) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_mqtt, topic, data, wall)

    def _on_mqtt(self, topic: str, data: bytes, wall: float) -> None:
        deltas = self.state.on_mqtt(topic, data, wall)
        for delta in deltas:
            if delta["type"] == "cmd_reply":
                waiter = self._replies.pop(str(delta["reply"].get("id")), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(delta["reply"])
        self.broadcast(deltas)

    async def _poll_files(self) -> None:
        while True:
            try:
                deltas: list[Delta] = []
                for row in self.files.read_events():
                    deltas += self.state.on_event(row)
                for point in self.files.read_accuracy():
                    deltas += self.state.on_accuracy(point)
                self.broadcast(deltas)
            except Exception:  # keep watching: a file may be half written or replaced
                log.exception("reading the run's files failed")
            await asyncio.sleep(FILE_POLL_S)

    async def _poll_satellite(self) -> None:
        assert self.satellite is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                status = await loop.run_in_executor(None, self.satellite.read)
                if status is not None:
                    self.broadcast(self.state.on_satellite_status(status))
            except Exception:
                log.exception("reading the satellite state failed")
            await asyncio.sleep(SATELLITE_POLL_S)

    def broadcast(self, deltas: list[Delta]) -> None:
        if not deltas:
            return
        frame = b"".join(sse_frame(d) for d in deltas)
        for queue in list(self.queues):
            if queue.qsize() >= QUEUE_LIMIT:
                self.queues.discard(queue)
                queue.put_nowait(None)  # the page reconnects and starts again from a snapshot
            else:
                queue.put_nowait(frame)

    # -- operator commands ----------------------------------------------------------------------------------
    async def command(self, verb: str, fields: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        cmd_id = self.mqtt.command(verb, fields)
        waiter: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._replies[cmd_id] = waiter
        try:
            return await asyncio.wait_for(waiter, COMMAND_TIMEOUT_S)
        finally:
            self._replies.pop(cmd_id, None)


# -- HTTP -----------------------------------------------------------------------------------------------------
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    allowed = request.app[KEY_STATE].opts.allowed_hosts
    if allowed and request.host not in allowed:
        # a page of another site that rebinds its name to 127.0.0.1 must not read this one
        response: web.StreamResponse = _error(421, f"this dashboard answers to {', '.join(sorted(allowed))} only")
    else:
        response = await handler(request)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def _snapshot(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[KEY_STATE].state.snapshot(), dumps=_dumps)


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), default=str)


async def _stream(request: web.Request) -> web.StreamResponse:
    dash = request.app[KEY_STATE]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
    response.headers["Content-Security-Policy"] = CSP
    await response.prepare(request)
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    # snapshot and subscription in one loop step: no delta can fall between them
    dash.queues.add(queue)
    await response.write(b"retry: 1000\n\n" + sse_frame(dash.state.snapshot()))
    try:
        while True:
            try:
                frame = await asyncio.wait_for(queue.get(), 15.0)
            except asyncio.TimeoutError:
                frame = b": keep-alive\n\n"
            if frame is None:
                break
            await response.write(frame)
    except ConnectionResetError:
        pass  # the page went away; a cancelled handler (server shutdown) propagates
    finally:
        dash.queues.discard(queue)
    return response


async def _command(request: web.Request) -> web.StreamResponse:
    dash = request.app[KEY_STATE]
    verb = request.match_info["verb"]
    token = dash.opts.operator_token
    if token is None:
        return _error(403, "read-only dashboard: operator commands need `emsfl dashboard --operator`")
    given = request.headers.get(TOKEN_HEADER, "")
    if not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
        return _error(401, f"missing or wrong operator token (header {TOKEN_HEADER})")
    if verb not in VERBS:
        return _error(404, f"unknown command {verb!r}; expected one of {', '.join(VERBS)}")
    try:
        fields = await request.json() if request.can_read_body else {}
    except json.JSONDecodeError:
        return _error(400, "the request body is not JSON")
    if not isinstance(fields, dict) or {"schema", "version", "id"} & set(fields):
        return _error(400, "the request body must be a JSON object of the command's fields")
    try:
        reply = await dash.command(verb, fields)
    except payloads.PayloadError as exc:
        return _error(400, str(exc))
    except asyncio.TimeoutError:
        return _error(504, f"no reply from the orbit service within {COMMAND_TIMEOUT_S:g} s")
    log.info("operator command %s %s: %s", verb, fields, "ok" if reply["ok"] else reply["error"])
    return web.json_response(reply, status=200 if reply["ok"] else 409)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"ok": False, "error": message}, status=status)


async def _csp_report(request: web.Request) -> web.StreamResponse:
    dash = request.app[KEY_STATE]
    body = await request.read()
    if len(dash.csp_reports) < 100:
        try:
            dash.csp_reports.append(json.loads(body))
        except (UnicodeDecodeError, json.JSONDecodeError):
            dash.csp_reports.append({"raw": body[:500].decode("utf-8", "replace")})
    log.warning("CSP violation reported by the page: %s", body[:300])
    return web.Response(status=204)


async def _csp_reports(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[KEY_STATE].csp_reports)


async def _health(request: web.Request) -> web.StreamResponse:
    dash = request.app[KEY_STATE]
    return web.json_response(
        {"mqtt_connected": dash.mqtt.connected.is_set(), "pages": len(dash.queues), "time": time.time()}
    )


def make_app(opts: DashboardOptions) -> web.Application:
    app = web.Application(middlewares=[_headers])
    dash = Dashboard(opts)
    app[KEY_STATE] = dash
    app.on_startup.append(dash.start)
    app.on_shutdown.append(dash.stop)
    app.router.add_get("/", _index)
    app.router.add_get("/api/snapshot", _snapshot)
    app.router.add_get("/api/stream", _stream)
    app.router.add_get("/api/health", _health)
    app.router.add_post("/api/cmd/{verb}", _command)
    app.router.add_post("/api/csp-report", _csp_report)
    app.router.add_get("/api/csp-reports", _csp_reports)
    app.router.add_static("/static/", STATIC_DIR, show_index=False, follow_symlinks=False)
    return app
