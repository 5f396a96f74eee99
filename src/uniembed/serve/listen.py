"""Where ``uniembed serve`` listens: the address is bound before the model loads, and uvicorn serves on that
very socket, so a busy port fails at once (one line, before any "serving on" message) and no other process
can take the port between the check and the start."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import typer

from uniembed.serve.limits import ServiceLimits


class StartError(Exception):
    """The service cannot start (busy port, bad index or model): one line for the user."""

    def __init__(self, message: str, model_hint: bool = False):
        super().__init__(message)
        self.model_hint = model_hint  # the model recorded in the index was the problem


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for ``host:port`` (port 0: any free one); ``OSError`` when it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run_uvicorn(app: Any, sock: socket.socket, host: str, log_level: str) -> bool:
    """Serve ``app`` on the bound socket until stopped; False if uvicorn could not start."""
    import uvicorn

    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    return bool(server.started)


def run_service(
    index: Path,
    model: Path | None,
    limits: ServiceLimits,
    host: str,
    port: int,
    engine: str,
    threads: int | None,
    verify: bool,
    log_level: str,
    edit_token: str | None = None,
) -> bool:
    """Bind, load the index and model, print where it serves, run until stopped; False if uvicorn could not
    start. Raises ``StartError`` for anything the user must fix first."""
    import faiss

    from uniembed.core.runtime import free_cores
    from uniembed.export.embedder import ModelError
    from uniembed.serve.app import create_app
    from uniembed.serve.index import ImageIndexError, open_index_and_model

    try:
        sock = listen_socket(host, port)
    except OSError as e:
        raise StartError(f"cannot listen on {host}:{port}: {e.strerror or e} (pick another --port)") from None
    with sock:
        try:
            ix, embedder = open_index_and_model(
                index, model, engine=engine, threads=threads or free_cores(), verify=verify
            )
            app = create_app(ix, embedder=embedder, limits=limits, edit_token=edit_token)
        except (ImageIndexError, ModelError) as e:
            hint = model is None and isinstance(e, ModelError)
            raise StartError(f"not starting: {e}", model_hint=hint) from None
        # One query per request: FAISS's OpenMP threads only add overhead and contend between requests.
        faiss.omp_set_num_threads(1)
        typer.echo(
            f"serving {len(app.state.index)} images (model {embedder.fingerprint}, {embedder.engine}) "
            f"on http://{host}:{sock.getsockname()[1]}/"
        )
        if app.state.index.adapted:
            typer.echo(app.state.index.describe_projection())
        if edit_token:
            typer.echo("edits on: POST /items and DELETE /items/{id} with Authorization: Bearer <token>")
        return run_uvicorn(app, sock, host, log_level)
