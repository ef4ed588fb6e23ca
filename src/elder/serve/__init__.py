"""`elder serve`: the live editing service (journal.py: the write-ahead journal; engine.py: the edited model, its
worker and checkpoints; app.py: the HTTP API). Needs the `serve` extra (FastAPI, uvicorn, prometheus-client)."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from elder.serve.engine import Engine, Limits, ServiceError

__all__ = ["Engine", "Limits", "ServiceError", "is_loopback", "serve", "spawn"]


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise ServiceError(f"cannot resolve host {host!r}") from None
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def serve(engine: Engine, host: str, port: int, token: str | None) -> None:
    """Answer on host:port until stopped (Ctrl-C or SIGTERM: the worker finishes its batch first)."""
    import uvicorn

    from elder.serve.app import build_app

    try:
        uvicorn.run(build_app(engine, token), host=host, port=port, log_level="warning")
    finally:
        engine.close()


def spawn(options: list[str], env: dict | None = None, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """Start `elder serve OPTIONS` on a free loopback port as a child process and wait until /health answers;
    (the process, its base URL). For tests and the load benchmark."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [sys.executable, "-c", "from elder.cli import app; app()", "serve", *options, "--host", "127.0.0.1",
            "--port", str(port)]
    process = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise ServiceError(f"elder serve exited: {process.stdout.read().decode().strip()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return process, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    process.kill()
    raise ServiceError(f"elder serve did not answer within {timeout:.0f} s")
