"""Draw queries beside their nearest indexed images (``uniembed search --grid``): a visual sanity check."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from uniembed.serve.index import Hit, ImageIndex


def _result_image(ix: ImageIndex, hit: Hit) -> Image.Image | None:
    """The stored thumbnail, else the indexed file, else None (drawn as a blank tile)."""
    from uniembed.data.images import BadImageError, load_image

    p = ix.thumbnail_path(hit.id)
    try:
        return load_image(p if p is not None else hit.path)
    except BadImageError:
        return None


def draw_grid(
    queries: Sequence[Image.Image], hits: Sequence[Sequence[Hit]], ix: ImageIndex, out: str | Path
) -> Path:
    """One row per query: the query (blue frame) then its results with label and distance; saves a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(queries)
    cols = 1 + max((len(h) for h in hits), default=0)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.7 * rows), squeeze=False)
    for r, (q, row_hits) in enumerate(zip(queries, hits, strict=True)):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.imshow(q)
                ax.set_title("query", fontsize=9, color="tab:blue")
                for s in ax.spines.values():
                    s.set_edgecolor("tab:blue")
                    s.set_linewidth(3)
                continue
            if c - 1 >= len(row_hits):
                ax.axis("off")
                continue
            h = row_hits[c - 1]
            im = _result_image(ix, h)
            if im is not None:
                ax.imshow(im)
            label = h.label if len(h.label) <= 24 else h.label[:23] + "…"
            ax.set_title(f"{c}. {label}\nd={h.distance:.3f}", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
