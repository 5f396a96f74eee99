"""Connecting to a Ray cluster for the stages that scale out (``extract --ray``, ``index --ray``): one place
for how ``auto`` / ``HOST:PORT`` are read, where Ray's notices go and how a failure is reported. Ray is
imported only here and only when asked for, so nothing else pays for it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any

RAY_MISSING = "--ray needs Ray: pip install 'uniembed[cluster]' (ray[data])"


@contextmanager
def ray_session(address: str, error: type[Exception]) -> Iterator[Any]:
    """Ray connected to ``address`` ("auto" or "": RAY_ADDRESS or a running local cluster, else a new local
    one; HOST:PORT), kept as is when this process already is connected, shut down after only if we
    connected. A missing Ray or an unreachable cluster raises ``error`` with one line."""
    try:
        import ray
    except ImportError as e:
        raise error(RAY_MISSING) from e
    if ray.is_initialized():
        yield ray
        return
    # Ray prints its notices (a task retried after a node died, ...) to stdout from a thread of its own, up
    # to the shutdown: they go to stderr, so stdout keeps only what the command prints (scripts read it).
    with redirect_stdout(sys.stderr):
        try:
            ray.init(
                address=None if address in ("", "auto") else address,
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=True,
                include_dashboard=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).splitlines()[0]
            raise error(f"cannot connect to the Ray cluster at {address}: {first}") from e
        try:
            yield ray
        finally:
            ray.shutdown()
