"""Time ``build_index`` (decode + thumbnails + embedding + FAISS) on a labels.csv with an exported model.

Usage (the figures in the serve stage's report came from these commands)::

    .venv/bin/python scripts/bench_index.py --model /tmp/lead_demo/model/saved_model.pt \
        --images /tmp/lead_demo/subset_labels.csv --engine auto
    .venv/bin/python scripts/bench_index.py ... --engine torch --threads 1

To time another checkout (e.g. the code before a change), put its ``src`` first on PYTHONPATH; options
that checkout's ``build_index`` does not know are dropped (and said so). Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="saved_model.pt (or its export folder)")
    ap.add_argument("--images", required=True, nargs="+", help="labels.csv / image folder / shards folder")
    ap.add_argument("--engine", default=None, help="auto | torch | onnxruntime (new code only)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the code's own)")
    ap.add_argument("--repeat", type=int, default=1, help="runs, each into a fresh folder")
    a = ap.parse_args()

    from uniembed.serve import index as index_mod

    params = inspect.signature(index_mod.build_index).parameters
    kwargs: dict = {"progress": False}
    for name in ("engine", "threads"):
        value = getattr(a, name)
        if value is None:
            continue
        if name in params:
            kwargs[name] = value
        elif name == "threads":  # old code: set torch's threads for the whole process instead
            import torch

            torch.set_num_threads(value)
        else:
            print(f"note: this checkout's build_index has no {name!r} option; ignored", file=sys.stderr)
    for _ in range(a.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = index_mod.build_index(a.model, a.images, Path(tmp) / "idx", **kwargs)
            wall = time.perf_counter() - t0
        print(
            json.dumps(
                {
                    "code": str(Path(index_mod.__file__).resolve().parents[2]),
                    "images": res.added,
                    "skipped": len(res.skipped),
                    "seconds": round(wall, 2),
                    "images_per_s": round(res.added / wall, 1),
                    "embedder": getattr(res, "embedder", None),
                    "options": {k: v for k, v in kwargs.items() if k != "progress"},
                    "loadavg_1min": round(os.getloadavg()[0], 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
