"""The request-body limit in front of the app: a body over ``--max-upload-mb`` answers 413 before anything
parses it (Starlette's multipart parser would spool any size to disk)."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Room for multipart boundaries and part headers on top of the image itself.
MULTIPART_SLACK = 64 * 1024
#: How much of a refused (413) body the server still reads and drops so the client gets its answer.
DRAIN_CAP_BYTES = 64 * 2**20


class BodySizeLimit:
    """Pure ASGI middleware: answer 413 before the app parses an over-large body.

    Starlette's multipart parser spools any size of upload to disk, so the limit must sit in front of it. The
    declared Content-Length is checked first; bodies without one (chunked) are counted as they arrive.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _drain(self, receive: Receive) -> None:
        """Read and drop the rest of a refused body (up to a cap) before answering 413.

        Why: closing a connection with unread request bytes makes the kernel send RST, and a keep-alive client
        then loses the 413 it was sent (measured in the soak: 96 of 169 oversized uploads). Past the cap the
        connection is dropped anyway, so a huge upload cannot keep the server reading."""
        left = max(8 * self.max_bytes, DRAIN_CAP_BYTES)
        while left > 0:
            msg = await receive()
            if msg["type"] == "http.disconnect" or not msg.get("more_body", False):
                return
            left -= len(msg.get("body", b""))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                await _send_json(send, 400, "invalid Content-Length header")
                return
            if n > self.max_bytes:
                await self._drain(receive)
                await _send_json(send, 413, self._too_large(n))
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                if msg.get("more_body", False):
                    await self._drain(receive)
                await _send_json(send, 413, self._too_large(size, at_least=True))
                return
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, n: int, at_least: bool = False) -> str:
        limit_mb = (self.max_bytes - MULTIPART_SLACK) / (1024 * 1024)
        return (
            f"upload too large: {'more than ' if at_least else ''}{n / (1024 * 1024):.1f} MiB; "
            f"the limit is {limit_mb:g} MiB"
        )


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
