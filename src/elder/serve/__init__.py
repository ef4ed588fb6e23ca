"""`elder serve`: the live editing service (journal.py: the write-ahead journal; engine.py: the edited model, its
worker and checkpoints; app.py: the HTTP API). Needs the `serve` extra (FastAPI, uvicorn, prometheus-client)."""

from __future__ import annotations

import ipaddress
import socket

from elder.serve.engine import Engine, Limits, ServiceError

__all__ = ["Engine", "Limits", "ServiceError", "is_loopback", "serve"]


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
