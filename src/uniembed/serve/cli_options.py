"""The options of ``uniembed index`` and ``uniembed serve``'s limits (and the engine/threads options shared
with search), as reusable ``Annotated`` types, so the command functions stay short."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uniembed.serve.limits import BOMB_MEGAPIXELS

INDEX_TYPE_HELP = (
    "FAISS index type: 'auto' (exact 'flat' below 20k images, 'hnsw' up to 500k, 'ivf' beyond), 'flat' "
    "(IndexFlatL2, exact), 'ivf' (IndexIVFFlat), 'ivfpq' (IndexIVFPQ, compressed), 'hnsw' (IndexHNSWFlat)."
)

EngineOption = Annotated[
    str,
    typer.Option(
        "--engine",
        help="How to run the model: 'auto' (the export's model.onnx in onnxruntime when export.json ties it "
        "to this saved_model.pt and it agrees on probe images, else TorchScript), 'torch' (always the "
        "TorchScript file), 'onnxruntime' (error if there is no verified model.onnx).",
    ),
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="Intra-op CPU threads for the model (default: the cores not already busy, by load average).",
    ),
]
RayOption = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="auto|HOST:PORT",
        help="Embed the images on a Ray cluster (pip install 'uniembed\\[cluster]'), then build the index "
        "here: 'auto' joins RAY_ADDRESS's cluster or a running local one, else starts one; HOST:PORT joins "
        "that head.",
    ),
]
RayActorsOption = Annotated[
    int | None,
    typer.Option("--ray-actors", min=1, help="Model replicas on the cluster (default: what fits)."),
]
RayCpusOption = Annotated[
    float, typer.Option("--ray-cpus-per-actor", min=0.0, help="CPUs each model actor reserves.")
]
RayGpusOption = Annotated[
    float, typer.Option("--ray-gpus-per-actor", min=0.0, help="GPUs each model actor reserves.")
]
RayTaskCpusOption = Annotated[
    float, typer.Option("--ray-cpus-per-task", min=0.01, help="CPUs each decode task reserves.")
]
ShardsOption = Annotated[
    int | None,
    typer.Option(
        "--shards",
        min=1,
        help="Build an ivfpq_sharded index (IVF-PQ trained on a sample, filled in N shards - as Ray tasks "
        "with --ray -, merged on disk and served memory-mapped); recall@5 against exact search is printed.",
    ),
]

NoVerifyOption = Annotated[
    bool,
    typer.Option(
        "--no-verify",
        help="Skip checking the index files against the checksums in index.json (a sha256 pass over them).",
    ),
]

# ----------------------------------------------------------------------------------------- uniembed index
ImagesOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--images",
        "-i",
        help="Images to index; repeatable. A "
        "labels.csv (path,label,domain; paths relative to the CSV), a "
        "folder holding labels.csv, a prepared shards folder "
        "(manifest.json), a folder of images labelled by parent "
        "folder name, or single image files.",
    ),
]
OutOption = Annotated[
    Path,
    typer.Option("--out", "-o", help="Index directory to write (replaced atomically; with --add, extended)."),
]
IndexModelOption = Annotated[
    Path | None,
    typer.Option(
        "--model",
        "-m",
        help="GUIE TorchScript saved_model.pt (or the export folder holding it) used to embed the "
        "images. Without it the index is collection-adapted (--adapt, default pcaw256 on "
        "mobilenetv2+efficientnet_lite2): it fits and stores its own query model.",
    ),
]
AdaptOption = Annotated[
    str | None,
    typer.Option(
        "--adapt",
        help="Collection-adapted index: embed the images with the frozen --backbone, fit a projection "
        "on those features (no labels) and store it with a query model in the index. 'pca<D>' (PCA to D "
        "dims), 'pcaw<D>' (PCA + square-root whitening), 'pcaw<D>@<power>' (whitening power in [0,1]; "
        "1 = full whitening). D <= min(images, feature dim). With --add --refit: refit to this spec.",
    ),
]
BackboneOption = Annotated[
    str | None,
    typer.Option(
        "--backbone",
        help="With --adapt: backbone computing the features (mobilenetv2, efficientnet_lite0/1/2, "
        "timm:<name>, ...). With --add on an adapted index it defaults to the stored one.",
    ),
]
PoolingOption = Annotated[
    str | None,
    typer.Option(
        "--pooling", help="With --adapt: the backbone's pooling (avg, gem, avg+stages, ...; default avg)."
    ),
]
RefitOption = Annotated[
    bool,
    typer.Option(
        "--refit",
        help="With --add on an adapted index: refit the projection on all stored features (old + new) "
        "and rewrite every vector and the query model (without it, --add keeps the projection).",
    ),
]
IndexTypeOption = Annotated[str, typer.Option("--type", "-t", help=INDEX_TYPE_HELP)]
AddOption = Annotated[
    bool,
    typer.Option(
        "--add",
        help="Append the images to the existing index at --out without "
        "re-embedding what is already there. Refuses a different model (its "
        "fingerprint must match); paths already indexed are skipped.",
    ),
]
BatchSizeOption = Annotated[
    int,
    typer.Option(
        "--batch-size",
        "-b",
        min=1,
        help="Images per model forward (images are resized by the model's own preprocessing first, so "
        "sizes mix; for models without it, images of one size are batched together).",
    ),
]
LimitOption = Annotated[
    int | None, typer.Option("--limit", min=1, help="Index at most this many images (quick trials).")
]
DomainOption = Annotated[
    str,
    typer.Option(
        "--domain",
        help="Domain recorded for images from plain folders (labels.csv and shards carry their own).",
    ),
]
ThumbSizeOption = Annotated[
    int,
    typer.Option(
        "--thumb-size",
        min=16,
        max=1024,
        help="Longest side of the stored thumbnails served by `uniembed serve`.",
    ),
]

# ------------------------------------------------------------------------------- FAISS parameter overrides
NlistOption = Annotated[
    int | None, typer.Option("--nlist", min=1, help="IVF: number of inverted lists (default ~4*sqrt(N)).")
]
NprobeOption = Annotated[
    int | None,
    typer.Option(
        "--nprobe",
        min=1,
        help="IVF: lists visited per query; higher = better recall, slower (default max(8, nlist/8)).",
    ),
]
PqMOption = Annotated[
    int | None,
    typer.Option(
        "--pq-m",
        min=1,
        help="IVFPQ: sub-quantizers; must divide the embedding dim (default 16 for 64-d).",
    ),
]
PqBitsOption = Annotated[
    int | None,
    typer.Option("--pq-bits", min=1, max=16, help="IVFPQ: bits per sub-quantizer code (default 8)."),
]
HnswMOption = Annotated[
    int | None, typer.Option("--hnsw-m", min=2, help="HNSW: graph neighbours per node (default 32).")
]
EfConstructionOption = Annotated[
    int | None,
    typer.Option("--ef-construction", min=1, help="HNSW: build-time search depth (default 80)."),
]
EfSearchOption = Annotated[
    int | None,
    typer.Option(
        "--ef-search", min=1, help="HNSW: query-time search depth; higher = better recall (default 64)."
    ),
]

# ----------------------------------------------------------------------------------------- uniembed serve
MaxUploadOption = Annotated[
    float,
    typer.Option(
        "--max-upload-mb", min=0.01, help="Largest accepted upload in MiB; bigger requests get HTTP 413."
    ),
]
DefaultKOption = Annotated[
    int, typer.Option("--default-k", min=1, help="Results per query when the request gives no k.")
]
MaxKOption = Annotated[int, typer.Option("--max-k", min=1, help="Largest k a request may ask for.")]
MaxPixelsOption = Annotated[
    float,
    typer.Option(
        "--max-pixels",
        min=0.01,
        max=BOMB_MEGAPIXELS,
        help="Largest image area an upload may have, in megapixels (40 = 40 million pixels, e.g. 8000 x "
        "5000). Checked from the header before decoding; bigger images get HTTP 422. Pillow decodes a PNG "
        "at full size once (~3-4 bytes a pixel), so this bounds what one request can hold; at most "
        f"{BOMB_MEGAPIXELS:.1f} (Pillow's decompression-bomb limit).",
    ),
]
MaxConcurrentOption = Annotated[
    int | None,
    typer.Option(
        "--max-concurrent",
        min=1,
        help="Uploads decoded + embedded at once (default: the number of CPU cores). Peak memory grows "
        "with it: up to about --max-pixels x 4 bytes each.",
    ),
]
QueueOption = Annotated[
    int,
    typer.Option(
        "--queue",
        min=0,
        help="Requests that may wait for a free slot; beyond that, or after --queue-timeout, HTTP 503 "
        "with a Retry-After header.",
    ),
]
QueueTimeoutOption = Annotated[
    float,
    typer.Option("--queue-timeout", min=0.0, help="Seconds a request waits for a slot before its 503."),
]

# ---------------------------------------------------------------------------------------- uniembed search
MaxDistanceOption = Annotated[
    float | None,
    typer.Option(
        "--max-distance",
        min=0.0,
        max=2.0,
        help="Drop results farther than this (Euclidean distance between unit vectors: 0 = the same "
        "picture, 2 = opposite).",
    ),
]
FilterOption = Annotated[
    list[str] | None,
    typer.Option(
        "--filter",
        help="Only items with COLUMN=VALUE, COLUMN^=PREFIX (starts with) or COLUMN!=VALUE; repeat to "
        "combine (all must hold). Columns: label, domain, path, source and the extra columns of the "
        "labels.csv the index was built from.",
    ),
]
ItemIdOption = Annotated[
    int | None,
    typer.Option(
        "--id",
        min=0,
        help="More like this: search with the stored vector of this indexed item (left out of its own "
        "results) instead of query images.",
    ),
]
NoExpandOption = Annotated[
    bool,
    typer.Option(
        "--no-expand",
        help="Search with the plain query vector: no query expansion (on by default for an index of a GUIE "
        "model: alpha-QE over the 2 nearest items, measured +0.010 mP@5 on unseen domains).",
    ),
]

# ------------------------------------------------------------------------------------------------- edits
RemoveOption = Annotated[
    list[str] | None,
    typer.Option(
        "--remove",
        help="Remove this item from the index at --out instead of building: its id (all digits) or its "
        "indexed path; repeatable. Other items keep their ids and thumbnails; removed ids are never reused. "
        "An unknown id or path is an error (exit 2) and nothing is removed.",
    ),
]
RemoveFromOption = Annotated[
    Path | None,
    typer.Option(
        "--remove-from",
        help="Remove the ids or paths listed in this file, one per line (e.g. the to_delete.txt of "
        "`uniembed dedup --keep`); blank lines and lines starting with # are skipped.",
    ),
]
AllowEditsOption = Annotated[
    bool,
    typer.Option(
        "--allow-edits",
        help="Enable POST /items (add an image) and DELETE /items/{id} on the live index. Needs a token "
        "(--edit-token or UNIEMBED_EDIT_TOKEN); each edit must send 'Authorization: Bearer TOKEN'.",
    ),
]
EditTokenOption = Annotated[
    str | None,
    typer.Option(
        "--edit-token",
        envvar="UNIEMBED_EDIT_TOKEN",
        show_envvar=True,
        help="The bearer token edits must carry (with --allow-edits). Prefer the environment variable: "
        "a command-line argument is visible to other users of the machine in the process list.",
    ),
]
