"""``dllmctl serve`` (the OpenAI-compatible HTTP API) and ``dllmctl mcp`` (the MCP server on stdio).

Both need the ``api`` extra (``pip install 'dllm[api]'``); it is imported only when they run, so
every other command works without it.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Annotated, Optional

import typer

from dllmctl.cli.common import PrivateLayersOpt, PrivateOpt, err, fail, load_registry, load_user

MISSING_EXTRA = "this command needs the 'api' extra: pip install 'dllm[api]' (mcp, starlette, uvicorn)"


def serve_command(
    host: Annotated[str, typer.Option(help="Address to listen on (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free port, printed).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="DLLM_API_KEY", help="Require 'Authorization: Bearer KEY' (or set DLLM_API_KEY, which keeps the key "
                                    "out of the process list).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level (access lines at info).")] = "info",
    private: PrivateOpt = False,
    private_layers: PrivateLayersOpt = 1,
    allowed_host: Annotated[Optional[list[str]], typer.Option(
        help="Another name clients reach this server by (Host header), besides localhost and --host; "
             "repeatable. IP addresses are always accepted.")] = None,
    rate_limit: Annotated[str, typer.Option(help="Requests per API key (or client address without one), "
                                                 "as N/s or N/min.")] = "10/s",
    burst: Annotated[int, typer.Option(min=1, help="Requests a caller may make at once after being idle.")] = 20,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Largest request body.")] = 1024 * 1024,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens one request may generate.")] = 4096,
    max_messages: Annotated[int, typer.Option(min=1, help="Most messages in one chat request.")] = 512,
    max_seconds: Annotated[float, typer.Option(min=0.01, help="Longest one completion may run, streamed or "
                                                              "not.")] = 600.0,
    dashboard: Annotated[bool, typer.Option("--dashboard", help="Also serve a web page at /dashboard/: nodes and "
                                                                "their layers, tokens/s, jobs, events, a chat box "
                                                                "(its data takes the API key too).")] = False,
) -> None:
    """Serve the cluster as an OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions."""
    if api_key is not None and not api_key.strip():
        fail("--api-key is empty")
    if not api_key and not _is_loopback(host):
        # Whoever reaches the port would use the cluster as you: no key, no listening beyond this machine.
        fail(f"refusing to listen on {host} without --api-key (or DLLM_API_KEY): anyone who can reach this port "
             f"could use your cluster as you; set a key, or listen on 127.0.0.1")
    try:
        import uvicorn

        from dllmctl.frontends.openai_api import make_app
        from dllmctl.frontends.serve_limits import ServeLimits, allowed_hosts, parse_rate
    except ImportError:
        fail(MISSING_EXTRA)
    try:
        limits = ServeLimits(max_body_bytes=max_body_bytes, max_tokens=max_tokens, max_messages=max_messages,
                             max_seconds=max_seconds, rate=parse_rate(rate_limit), burst=burst)
    except ValueError as exc:
        fail(f"--rate-limit: {exc}")
    user = load_user()
    load_registry()  # refuse a broken cluster.toml now rather than on the first request
    sock = _listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    # One line a script can read (tests do): the real port, also when --port 0 picked it.
    base = f"http://{shown}:{sock.getsockname()[1]}"
    err.print(f"dllmctl serve: listening on {base}/v1", highlight=False)
    if dashboard:
        err.print(f"dllmctl serve: dashboard on {base}/dashboard/", highlight=False)
    app = make_app(user, api_key, limits, allowed_hosts(host, allowed_host or []),
                   private_layers if private else 0, dashboard)
    config = uvicorn.Config(app, log_level=log_level, loop="asyncio", lifespan="on",
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """Bind here, not in uvicorn, so that --port 0 works and a taken port is one clear line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.set_inheritable(True)
        return sock
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc}")


def mcp_command() -> None:
    """Serve the cluster to agents as MCP tools and resources over stdio (stdout carries only the protocol)."""
    try:
        from dllmctl.frontends.mcp_server import serve_stdio
    except ImportError:
        fail(MISSING_EXTRA)
    user = load_user()
    load_registry()
    serve_stdio(user)
