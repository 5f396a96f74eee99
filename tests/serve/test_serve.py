"""HTTP service, in-process: every endpoint and every error path (FastAPI TestClient, tiny real model)."""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from uniembed.cli import app as cli_app
from uniembed.export.embedder import file_fingerprint, load_embedder
from uniembed.serve.app import create_app, sniff_image_type
from uniembed.serve.index import ModelMismatchError, build_index
from uniembed.serve.limits import MAX_K
from uniembed_lab.scaffold.tiny_model import make_synthetic_images, make_tiny_model


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    model = make_tiny_model(root / "saved_model.pt", seed=0)
    other = make_tiny_model(root / "other" / "saved_model.pt", seed=1)
    images = make_synthetic_images(root / "imgs", labels=3, per_label=4)
    build_index(model, [root / "imgs"], root / "idx", progress=False)
    return {"root": root, "model": model, "other": other, "index": root / "idx", "query": images[5]}


@pytest.fixture(scope="module")
def client(env: dict[str, Path]) -> TestClient:
    return TestClient(create_app(env["index"], env["model"], max_upload_mb=0.25, max_k=20))


def jpeg_bytes(size: tuple[int, int] = (60, 40), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, valid-looking PNG header that claims 10^10 pixels (decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def asgi_get(app: object, raw_path: str) -> tuple[int, bytes]:
    """GET ``raw_path`` exactly as written (no URL normalisation) straight through the ASGI interface."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg: dict) -> None:
        sent.append(msg)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": raw_path,
        "raw_path": raw_path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[operator]
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_health_and_page(client: TestClient, env: dict[str, Path]) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["count"] == 12 and h["dim"] == 64
    assert h["model_fingerprint"] == file_fingerprint(env["model"])
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="results"' in page.text and "/static/app.js" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN or external asset
    js = client.get("/static/app.js")
    assert js.status_code == 200 and 'fetch("/search"' in js.text
    assert client.get("/static/style.css").status_code == 200


def test_search_returns_nearest_first_with_thumbnails(client: TestClient, env: dict[str, Path]) -> None:
    q = env["query"]
    r = client.post("/search", files={"image": (q.name, q.read_bytes(), "image/png")}, data={"k": "4"})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 4
    assert res[0]["path"] == str(q) and res[0]["distance"] < 1e-3 and res[0]["label"] == q.parent.name
    d = [x["distance"] for x in res]
    assert d == sorted(d)
    assert set(res[0]) >= {"path", "label", "domain", "distance", "thumbnail"}
    for x in res:
        t = client.get(x["thumbnail"])
        assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(t.content)).size[0] <= 160

    # k via query string, default k, raw image body instead of multipart.
    assert len(client.post("/search?k=2", files={"image": ("q.png", q.read_bytes())}).json()["results"]) == 2
    assert len(client.post("/search", files={"image": ("q.png", q.read_bytes())}).json()["results"]) == 5
    raw = client.post("/search", content=q.read_bytes(), headers={"content-type": "image/png"})
    assert raw.status_code == 200 and raw.json()["results"][0]["path"] == str(q)


def test_embed_matches_the_model(client: TestClient, env: dict[str, Path]) -> None:
    q = env["query"]
    r = client.post("/embed", files={"image": ("q.png", q.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    emb = np.array(r.json()["embedding"], dtype=np.float32)
    assert emb.shape == (64,) and abs(float(np.linalg.norm(emb)) - 1) < 1e-4
    from uniembed.data.images import load_image

    np.testing.assert_allclose(emb, load_embedder(env["model"]).embed_images([load_image(q)])[0], atol=1e-5)


BAD_UPLOADS = [  # files, form data, headers, raw body, expected status, expected words in "detail"
    ({"image": ("a.txt", b"hello world", "text/plain")}, None, None, None, 415, "unsupported media type"),
    (
        {"image": ("a.bin", b"definitely not an image", "application/octet-stream")},
        None,
        None,
        None,
        415,
        "not an image",
    ),
    ({"image": ("a.jpg", b"<html>oops</html>", "image/jpeg")}, None, None, None, 415, "not an image"),
    ({"image": ("a.svg", b"<svg/>", "image/svg+xml")}, None, None, None, 415, "unsupported media type"),
    ({"image": ("a.jpg", b"", "image/jpeg")}, None, None, None, 400, "empty"),
    (
        {"image": ("a.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 200, "image/jpeg")},
        None,
        None,
        None,
        422,
        "cannot decode",
    ),
    ({"image": ("a.jpg", jpeg_bytes()[:120], "image/jpeg")}, None, None, None, 422, "cannot decode"),
    ({"other": ("a.jpg", jpeg_bytes(), "image/jpeg")}, None, None, None, 400, "missing form field 'image'"),
    (None, {"image": "not a file"}, None, None, 400, "must be a file"),
    (None, None, {"content-type": "application/json"}, b'{"image": 1}', 415, "unsupported request type"),
    (None, None, {"content-type": "text/plain"}, b"hi", 415, "unsupported request type"),
    (None, None, {"content-type": "image/png"}, b"", 400, "no image: send the file as multipart/form-data"),
    (None, None, {}, b"", 400, "no image: send the file as multipart/form-data field 'image'"),
    (
        [("image", ("a.jpg", jpeg_bytes(), "image/jpeg")), ("image", ("b.jpg", jpeg_bytes(), "image/jpeg"))],
        None,
        None,
        None,
        422,
        "send one image per request; got 2 'image' fields",
    ),
    ({"image": ("a.jpg", jpeg_bytes(), "image/jpeg")}, {"k": "0"}, None, None, 422, "k must be between"),
    ({"image": ("a.jpg", jpeg_bytes(), "image/jpeg")}, {"k": "999"}, None, None, 422, "k must be between"),
    (
        {"image": ("a.jpg", jpeg_bytes(), "image/jpeg")},
        {"k": "five"},
        None,
        None,
        422,
        "k must be an integer",
    ),
    # Pixels over the budget: 422 about pixels (413 is for bytes only), refused from the header alone.
    (
        {"image": ("a.png", png_bomb(9000, 9000), "image/png")},
        None,
        None,
        None,
        422,
        "image is 9000x9000 = 81.0 MP; this server accepts at most 40.0 MP (--max-pixels)",
    ),
    (
        {"image": ("a.png", png_bomb(), "image/png")},
        None,
        None,
        None,
        422,
        "MP (a decompression bomb); this server accepts at most 40.0 MP (--max-pixels)",
    ),
]


@pytest.mark.parametrize(
    "endpoint,files,data,headers,content,code,needle",
    [
        (ep, *case)
        for ep in ("/search", "/embed")
        for case in BAD_UPLOADS
        if ep == "/search" or "k must" not in case[5]
    ],
)
def test_bad_uploads_get_clear_4xx(
    client: TestClient,
    endpoint: str,
    files: dict | None,
    data: dict | None,
    headers: dict | None,
    content: bytes | None,
    code: int,
    needle: str,
) -> None:
    kwargs: dict = {}
    if files is not None:
        kwargs["files"] = files
    if data is not None:
        kwargs["data"] = data
    if content is not None:
        kwargs["content"] = content
    if headers is not None:
        kwargs["headers"] = headers
    if files is None and data is not None:  # a multipart body without any file part
        kwargs["files"] = {"unused": ("", b"")}
    r = client.post(endpoint, **kwargs)
    assert r.status_code == code, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert needle in r.json()["detail"]


def test_upload_size_limit(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    big = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(400, 400, 3), dtype=np.uint8)).save(big, format="PNG")
    assert len(big.getvalue()) > 0.25 * 2**20
    r = client.post("/search", files={"image": ("big.png", big.getvalue(), "image/png")})
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    r = client.post("/embed", content=big.getvalue(), headers={"content-type": "image/png"})
    assert r.status_code == 413

    def chunks():  # no Content-Length: the limit must be enforced while streaming
        data = big.getvalue()
        for i in range(0, len(data), 64 * 1024):
            yield data[i : i + 64 * 1024]

    r = client.post("/embed", content=chunks(), headers={"content-type": "image/png"})
    assert r.status_code == 413 and "more than" in r.json()["detail"]
    r = client.post("/embed", content=b"x", headers={"content-type": "image/png", "content-length": "abc"})
    assert r.status_code == 400
    assert client.get("/health").status_code == 200  # still alive


def test_thumbnails_only_for_indexed_ids(client: TestClient, env: dict[str, Path]) -> None:
    assert client.get("/thumb/0").status_code == 200
    assert client.get("/thumb/11").status_code == 200
    for bad in [
        "/thumb/12",
        "/thumb/999999999",
        "/thumb/-1",
        "/thumb/abc",
        "/thumb/1.5",
        "/thumb/%2e%2e",
        "/thumb/..%2F..%2Fetc%2Fpasswd",
        "/thumb/0%2F..%2F..%2Findex.json",
        "/thumb/" + "9" * 40,
    ]:
        r = client.get(bad)
        assert r.status_code == 404, bad
        assert b"root:" not in r.content
    # HTTP clients normalise "..", so hand the raw path to the ASGI app ourselves.
    for raw in ("/thumb/../../etc/passwd", "/thumb/0/../../../etc/passwd", "/static/../../../etc/passwd"):
        status, body = asgi_get(client.app, raw)
        assert status == 404, raw
        assert b"root:" not in body
    assert client.get("/static/../index.json").status_code == 404
    assert client.get("/static/..%2F..%2Findex.json").status_code == 404


def test_thumbnail_fallback_without_stored_thumbs(env: dict[str, Path], tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    shutil.copytree(env["index"], idx)
    shutil.rmtree(idx / "thumbs")
    c = TestClient(create_app(idx, env["model"]))
    r = c.get("/thumb/3")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert c.get("/thumb/12").status_code == 404


def test_refuses_a_different_model(env: dict[str, Path]) -> None:
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        create_app(env["index"], env["other"])
    r = CliRunner().invoke(
        cli_app, ["serve", "--index", str(env["index"]), "--model", str(env["other"]), "--port", "0"]
    )
    assert r.exit_code == 2
    assert "not starting" in r.output and "fingerprint" in r.output
    r = CliRunner().invoke(cli_app, ["serve", "--index", str(env["root"] / "nope"), "--port", "0"])
    assert r.exit_code == 2 and "not an index directory" in r.output


def test_model_defaults_to_the_one_in_the_index(env: dict[str, Path]) -> None:
    c = TestClient(create_app(env["index"]))
    assert c.get("/health").json()["model_fingerprint"] == file_fingerprint(env["model"])


def test_sniffing() -> None:
    assert sniff_image_type(jpeg_bytes()) == "image/jpeg"
    assert sniff_image_type(png_bomb()) == "image/png"
    assert sniff_image_type(b"GIF89a....") == "image/gif"
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff_image_type(b"%PDF-1.4") is None


def test_internal_failure_is_one_500_not_a_dead_server(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(env["index"], env["model"], warmup=False)
    c = TestClient(app, raise_server_exceptions=False)

    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("simulated model failure")

    monkeypatch.setattr(app.state.embedder, "embed_images", broken)
    r = c.post("/search", files={"image": ("q.png", env["query"].read_bytes(), "image/png")})
    assert r.status_code == 500 and "simulated model failure" in r.json()["detail"]
    monkeypatch.undo()
    assert c.get("/health").status_code == 200
    r = c.post("/search", files={"image": ("q.png", env["query"].read_bytes(), "image/png")})
    assert r.status_code == 200


def test_health_reports_the_limits(client: TestClient) -> None:
    h = client.get("/health").json()
    assert h["max_megapixels"] == 40.0 and h["max_k"] == 20 and h["max_upload_mb"] == 0.25
    assert h["max_concurrent"] >= 1 and h["busy"] == 0 and h["waiting"] == 0


def test_search_cli_k_has_the_servers_limit(env: dict[str, Path]) -> None:
    """`search -k` over the limit fails with the server's message instead of returning the whole index."""
    q = str(env["query"])
    for k in (str(MAX_K + 1), "100000", "0"):
        r = CliRunner().invoke(cli_app, ["search", "--index", str(env["index"]), "-k", k, q])
        assert r.exit_code == 2, r.output
        assert f"k must be between 1 and {MAX_K}, got {k}" in r.output
    r = CliRunner().invoke(cli_app, ["search", "--index", str(env["index"]), "-k", str(MAX_K), "--json", q])
    assert r.exit_code == 0, r.output
    c = TestClient(create_app(env["index"], env["model"], warmup=False))
    r = c.post("/search", files={"image": ("q.png", env["query"].read_bytes())}, data={"k": str(MAX_K + 1)})
    assert r.status_code == 422 and f"k must be between 1 and {MAX_K}, got {MAX_K + 1}" in r.json()["detail"]


def test_serve_on_a_busy_port_fails_before_serving(env: dict[str, Path]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        args = ["serve", "--index", str(env["index"]), "--model", str(env["model"]), "--port", str(port)]
        r = CliRunner().invoke(cli_app, args)
    assert r.exit_code == 2, r.output
    assert f"cannot listen on 127.0.0.1:{port}" in r.output and "address already in use" in r.output.lower()
    assert "serving" not in r.output
    assert len(r.output.strip().splitlines()) == 1
