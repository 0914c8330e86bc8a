"""The dashboard's routes in ``dllmctl serve --dashboard``: the page (static files, no secrets in
them, so served without the key; the Host check and rate limit still apply) and its data endpoints,
which take the API key exactly as ``/v1`` does. The chat box talks to ``/v1/chat/completions`` itself."""

from __future__ import annotations

import re
from importlib.resources import files
from typing import TYPE_CHECKING, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from dllmd.net.client import CallError
from dllmctl.frontends.dashboard import data
from dllmctl.frontends.openai_requests import ApiError, bad_request
from dllmctl.training.jobs import TrainError

if TYPE_CHECKING:  # openai_api imports this module when it builds the app
    from dllmctl.frontends.openai_api import Api

STEP = re.compile(r"^-?[0-9]{1,13}$")
STATIC_TYPES = {"index.html": "text/html; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8",
                "dashboard.css": "text/css; charset=utf-8"}
# The page runs only its own script and talks only to this server: a script injected through a
# node name or an event message would have nowhere to send the key.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                           "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
                                           "frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def static_files() -> dict[str, bytes]:
    """The page's files, read once: only these names are served, so no path reaches the disk."""
    folder = files("dllmctl.frontends.dashboard") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC_TYPES}


def dashboard_routes(api: "Api", guarded: Callable) -> list[Route]:
    """``api``: the server's :class:`~dllmctl.frontends.openai_api.Api` (user, registry, limits);
    ``guarded(handler, need_key)``: its admission and error handling, shared with ``/v1``."""
    static = static_files()

    async def page(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in static:
            raise ApiError(404, f"Invalid URL (GET {request.url.path})", code="not_found")
        return Response(static[name], media_type=STATIC_TYPES[name], headers=PAGE_HEADERS)

    async def snapshot(request: Request) -> Response:
        return JSONResponse(await data.snapshot(api.user, api.nodes()), headers={"Cache-Control": "no-store"})

    async def job_metrics(request: Request) -> Response:
        job = request.path_params["job"]
        if not data.JOB_NAME.match(job):
            raise bad_request(f"{job[:80]!r} is not a job name (letters, digits, '.', '_', '-'; at most 64)", "job")
        after = request.query_params.get("after_step", "-1")
        if not STEP.match(after) or not -1 <= int(after) < 2**40:
            raise bad_request(f"after_step must be a step number (or -1 for all), not {after[:40]!r}", "after_step")
        try:
            metrics = await data.metrics(api.user, api.nodes(), job, int(after))
        except TrainError as exc:
            raise ApiError(404, str(exc), param="job", code="job_not_found") from None
        except CallError as exc:
            raise ApiError(503, f"the job's coordinator did not answer: {exc}", type="server_error",
                           code="cluster_unavailable") from None
        return JSONResponse(metrics, headers={"Cache-Control": "no-store"})

    async def to_page(request: Request) -> Response:
        return RedirectResponse("/dashboard/")

    return [Route("/dashboard", guarded(to_page, need_key=False), methods=["GET"]),
            Route("/dashboard/", guarded(page, need_key=False), methods=["GET"]),
            Route("/dashboard/static/{name}", guarded(page, need_key=False), methods=["GET"]),
            Route("/dashboard/api/snapshot", guarded(snapshot), methods=["GET"]),
            Route("/dashboard/api/jobs/{job}/metrics", guarded(job_metrics), methods=["GET"])]
