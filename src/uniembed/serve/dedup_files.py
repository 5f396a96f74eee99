"""The file side of ``uniembed dedup``: facts about each grouped file, which one a group keeps, and the
outputs (groups.csv, summary.json, to_delete.txt, contact_sheet.png). Nothing here deletes a file."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniembed.core.fsutil import atomic_path, atomic_write_text

KEEP_POLICIES = ("largest", "oldest", "first")
GROUP_FIELDS = ["group", "kind", "id", "path", "width", "height", "bytes", "mtime", "keep"]


@dataclass
class FileFacts:
    """What the keep policies look at: pixel size (from the header only), byte size and mtime."""

    width: int | None
    height: int | None
    size: int | None
    mtime: float | None


def file_facts(path: str | Path) -> FileFacts:
    """Header size, bytes and mtime of a file; unknown fields are None (a missing or non-image file)."""
    from PIL import Image

    width = height = size = None
    mtime = None
    try:
        st = Path(path).stat()
        size, mtime = int(st.st_size), float(st.st_mtime)
        with Image.open(path) as im:  # reads the header, not the pixels
            width, height = (int(v) for v in im.size)
    except (OSError, ValueError, Image.DecompressionBombError):
        pass
    return FileFacts(width, height, size, mtime)


def choose_keeper(members: list[int], facts: dict[int, FileFacts], policy: str) -> int:
    """The member a group keeps: ``largest`` pixel count (then bytes), ``oldest`` mtime, or ``first`` in
    source order; ties go to the first in source order (members are positions in source order)."""
    if policy not in KEEP_POLICIES:
        raise ValueError(f"keep policy must be one of {', '.join(KEEP_POLICIES)}, got {policy!r}")
    if policy == "first":
        return min(members)

    def key(i: int) -> tuple[float, float, int]:
        f = facts[i]
        if policy == "largest":
            return (-float((f.width or 0) * (f.height or 0)), -float(f.size or 0), i)
        return (f.mtime if f.mtime is not None else float("inf"), 0.0, i)

    return min(members, key=key)


def group_rows(
    groups: list[dict[str, Any]], items: list[dict[str, str]], facts: dict[int, FileFacts]
) -> list[dict[str, Any]]:
    """groups.csv rows: one per member of each group (a file can be in an exact and a near group)."""
    rows = []
    for g in groups:
        for pos in g["members"]:
            f = facts[pos]
            rows.append(
                {
                    "group": g["group"],
                    "kind": g["kind"],
                    "id": items[pos]["id"],
                    "path": items[pos]["path"],
                    "width": "" if f.width is None else f.width,
                    "height": "" if f.height is None else f.height,
                    "bytes": "" if f.size is None else f.size,
                    "mtime": "" if f.mtime is None else round(f.mtime, 3),
                    "keep": int(pos == g["keep"]),
                }
            )
    return rows


def write_groups_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=GROUP_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")


def write_to_delete(path: Path, paths: list[str]) -> None:
    atomic_write_text(path, "".join(p + "\n" for p in paths))


def contact_sheet(
    path: Path,
    groups: list[dict[str, Any]],
    thumbs: list[Path | None],
    max_groups: int = 8,
    max_members: int = 8,
    cell: int = 128,
) -> bool:
    """A PNG of the largest groups, one row each (kept file first, framed green; others framed red), from
    the index's thumbnails. False (nothing written) when there are no groups."""
    from PIL import Image, ImageDraw

    shown = groups[:max_groups]
    if not shown:
        return False
    label_h, pad = 16, 4
    cols = min(max_members, max(len(g["members"]) for g in shown))
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, len(shown) * (cell + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, g in enumerate(shown):
        y = pad + r * (cell + label_h + pad)
        more = f" (+{len(g['members']) - cols} more)" if len(g["members"]) > cols else ""
        dist = f", max distance {g['max_distance']:.3f}" if g["kind"] == "near" else ""
        draw.text(
            (pad, y), f"group {g['group']}: {g['kind']}, {len(g['members'])} files{dist}{more}", "black"
        )
        ordered = [g["keep"], *(m for m in g["members"] if m != g["keep"])][:cols]
        for c, pos in enumerate(ordered):
            x, top = pad + c * (cell + pad), y + label_h
            t = thumbs[pos]
            if t is not None and t.is_file():
                try:
                    with Image.open(t) as im:
                        im = im.convert("RGB")
                        im.thumbnail((cell - 4, cell - 4))
                        sheet.paste(im, (x + (cell - im.width) // 2, top + (cell - im.height) // 2))
                except OSError:
                    draw.text((x + 8, top + cell // 2), "unreadable", "grey")
            else:
                draw.text((x + 8, top + cell // 2), "no thumbnail", "grey")
            colour = "green" if pos == g["keep"] else "red"
            draw.rectangle((x, top, x + cell - 1, top + cell - 1), outline=colour, width=2)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return True
