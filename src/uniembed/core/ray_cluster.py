"""Connecting to a Ray cluster for the stages that scale out (``extract --ray``, ``index --ray``): one place
for how ``auto`` / ``HOST:PORT`` are read, where Ray's notices go and how a failure is reported. Ray is
imported only here and only when asked for, so nothing else pays for it."""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any

RAY_MISSING = "--ray needs Ray: pip install 'uniembed[cluster]' (ray[data])"
#: Seconds to wait for a TCP connection to HOST:PORT before giving up (Ray itself retries for minutes).
PROBE_SECONDS = 5.0


def check_reachable(address: str, error: type[Exception], timeout: float = PROBE_SECONDS) -> None:
    """Fail fast, with one line, when ``HOST:PORT`` (or ``ray://HOST:PORT``) takes no TCP connection: given an
    unreachable address, ``ray.init`` keeps retrying for minutes before it says anything. "auto" and
    addresses that are not HOST:PORT are left to Ray."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise error(
            f"cannot reach the Ray cluster at {address}: {why} (is `ray start --head` running there, with "
            "that port open to this machine?)"
        ) from None


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
    if address not in ("", "auto"):
        check_reachable(address, error)
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
