"""Edits over HTTP: ``POST /items`` adds an uploaded image to the live index, ``DELETE /items/{id}`` removes
one.

Off unless the server was started with ``--allow-edits`` and a token (``--edit-token`` or
``UNIEMBED_EDIT_TOKEN``): then each edit must carry ``Authorization: Bearer TOKEN`` (401 without it, 403 with
another); while off both answer 405 saying how to switch them on. Each edit runs through
``uniembed.serve.edits`` (rebuild-and-swap of the index folder, serialised by one lock) and then swaps
``app.state.index`` for the newly loaded index: a search already running keeps the index object it started
with, the next one sees the edit. Adding embeds under the same admission gate as searches.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from uniembed.serve.edits import AlreadyIndexedError, IndexEditor, NewImage, UnknownItemsError
from uniembed.serve.errors import ImageIndexError
from uniembed.serve.limits import ServiceLimits
from uniembed.serve.uploads import decode_upload, read_upload

#: Longest label, domain or metadata value a form may set (items.csv cells stay readable).
MAX_FIELD_CHARS = 500
#: Form fields that are not item metadata: the item's own columns and the search parameters.
_NOT_META = {"image", "label", "domain", "path", "source", "id", "meta", "k", "filter", "max_distance"}
EDITS_OFF = (
    "edits are off on this server: start it with --allow-edits and --edit-token TOKEN "
    "(or the UNIEMBED_EDIT_TOKEN environment variable)"
)


@dataclass
class EditConfig:
    """What the edit routes need at request time (``app.state.edits``)."""

    token: str | None
    editor: IndexEditor
    limits: ServiceLimits


def _authorise(request: Request) -> EditConfig:
    """405 when edits are off, 401 without a bearer token, 403 with a wrong one."""
    cfg: EditConfig = request.app.state.edits
    if not cfg.token:
        raise HTTPException(405, EDITS_OFF, headers={"Allow": ""})
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise HTTPException(
            401, "edits need the header 'Authorization: Bearer TOKEN'", headers={"WWW-Authenticate": "Bearer"}
        )
    if not hmac.compare_digest(given.strip().encode(), cfg.token.encode()):
        raise HTTPException(403, "wrong edit token")
    return cfg


def _field(fields: dict[str, Any], name: str) -> str:
    value = str(fields.get(name, "")).strip()
    if len(value) > MAX_FIELD_CHARS or any(c in value for c in "\r\n\x00"):
        raise HTTPException(422, f"form field {name!r}: at most {MAX_FIELD_CHARS} characters on one line")
    return value


def _new_image(data: bytes, fields: dict[str, Any]) -> NewImage:
    """The upload with its label, domain and any other form fields as item metadata."""
    meta = {k: _field(fields, k) for k in sorted(fields) if k not in _NOT_META and isinstance(fields[k], str)}
    meta = {k: v for k, v in meta.items() if v}
    return NewImage(data, _field(fields, "label"), _field(fields, "domain"), meta)


def _reload(app: FastAPI, cfg: EditConfig) -> int:
    """Load the edited index and make it the one new requests use; its item count."""
    from uniembed.serve.store import ImageIndex

    new = ImageIndex.load(cfg.editor.out_dir, verify=False)  # written and checksummed a moment ago
    app.state.index = new
    return len(new)


def _register(app: FastAPI) -> None:
    """The two routes, once per app; they read ``app.state.edits`` at request time."""

    @app.post("/items", status_code=201)
    async def add_item(request: Request) -> dict[str, Any]:
        """Add the uploaded image (multipart ``image``, optional ``label``, ``domain`` and metadata fields)
        to the index; answers its new id."""
        cfg = _authorise(request)
        data, fields = await read_upload(request, cfg.limits)
        image = _new_image(data, fields)

        def edit() -> tuple[Any, int]:
            decode_upload(data, cfg.limits)  # 422 for too many pixels or undecodable, before any edit
            res = cfg.editor.add([image])
            return res, _reload(app, cfg)

        async with request.app.state.admission.slot():
            try:
                res, count = await run_in_threadpool(edit)
            except AlreadyIndexedError as e:
                raise HTTPException(409, f"{e}; nothing was added") from None
            except ImageIndexError as e:
                raise HTTPException(422, str(e)) from None
        item = res.added[0]
        new_id = int(item["id"])
        return {
            "id": new_id,
            "label": item["label"],
            "domain": item["domain"],
            "thumbnail": f"/thumb/{new_id}",
            "count": count,
            "took_ms": round(res.seconds * 1000, 2),
        }

    @app.delete("/items/{item_id}")
    async def delete_item(item_id: str, request: Request) -> dict[str, Any]:
        """Remove an indexed item by its id; its id is never given to another item."""
        cfg = _authorise(request)
        if not item_id.isdigit() or len(item_id) > 12:
            raise HTTPException(404, f"no item with id {item_id[:20]!r}")

        def edit() -> tuple[Any, int]:
            res = cfg.editor.remove(ids=[int(item_id)])
            return res, _reload(app, cfg)

        try:
            res, count = await run_in_threadpool(edit)
        except UnknownItemsError:
            raise HTTPException(404, f"no item with id {item_id}") from None
        except ImageIndexError as e:
            raise HTTPException(422, str(e)) from None
        return {"removed": int(item_id), "path": res.removed[0]["path"], "count": count}


def add_edit_routes(app: FastAPI, embedder: Any, limits: ServiceLimits, token: str | None) -> None:
    """Add ``POST /items`` and ``DELETE /items/{id}`` to the app (after the search routes, which set
    ``app.state.admission``); ``token`` None or empty keeps edits off. Calling it again reconfigures."""
    index = app.state.index
    editor = IndexEditor(index.root, embedder=None if index.adapted else embedder)
    first = not hasattr(app.state, "edits")
    app.state.edits = EditConfig(token or None, editor, limits)
    if first:
        _register(app)
