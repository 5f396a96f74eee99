"""Run ``uniembed serve`` in a child process on a free loopback port (browser test, load test, benchmarks).

A separate process, not a thread, so the measuring client and the server do not share one GIL and the server
is exercised exactly as a user starts it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

#: Flags for Debian's headless Chromium on a machine with no network beyond loopback: without the
#: background-networking ones it keeps trying (and failing) to reach Google's hosts.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> str | None:
    """The system Chromium (Debian's package); browser checks never download a browser of their own."""
    import shutil

    return shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@contextmanager
def chromium_page(chromium: str, width: int, height: int) -> Iterator[tuple[Any, list[str]]]:
    """A page of the system Chromium (Playwright's Python driver) and the list its uncaught page errors
    collect in, so a browser test can assert the page ran clean; the browser is closed whatever happens."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page, errors
        finally:
            browser.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (the caller retries if another process grabs it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """Context manager: start the service, wait until ``/health`` answers, stop it on exit."""

    def __init__(
        self,
        index_dir: str | Path,
        model_path: str | Path | None = None,
        host: str = "127.0.0.1",
        extra_args: list[str] | None = None,
        startup_timeout: float = 90.0,
    ):
        self.index_dir = Path(index_dir)
        self.model_path = model_path
        self.host = host
        self.extra_args = extra_args or []
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._log = tempfile.TemporaryFile()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log(self) -> str:
        """Everything the server printed so far (for failure messages)."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def start(self) -> ServerProcess:
        import httpx

        for _attempt in range(3):
            self.port = free_port(self.host)
            cmd = [
                sys.executable,
                "-m",
                "uniembed.cli",
                "serve",
                "--index",
                str(self.index_dir),
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                *self.extra_args,
            ]
            if self.model_path is not None:
                cmd += ["--model", str(self.model_path)]
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            if self.proc.poll() is None:
                self.stop()
                raise RuntimeError(
                    f"server did not answer /health in {self.startup_timeout:.0f}s:\n{self.log()}"
                )
            if "address already in use" not in self.log().lower():
                raise RuntimeError(f"server exited with code {self.proc.returncode}:\n{self.log()}")
        raise RuntimeError(f"no free port after 3 tries:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self._log.close()
