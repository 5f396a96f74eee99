"""Image sources: a ``labels.csv``, an ImageFolder tree, and adapters for the native layouts of public sets.

Every source yields ``Record(path, label, domain, source)``. Native-layout adapters prefix labels with the
source name (``gldv2:123``) so classes stay distinct when several sets are merged; ``labels.csv`` keeps its
labels as written (our own CSVs already carry a prefix such as ``grocery:``) unless ``prefix=`` is given.

CLI spec strings: ``KIND:PATH[:key=value...]``, e.g. ``imagefolder:/dir:domain=toys``,
``fashion:/root:label=articleType``; a bare ``*.csv`` path (or a folder holding ``labels.csv``) is a
``labels.csv`` source.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: File extensions treated as images when walking folders.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataError(Exception):
    """A user-facing problem with the input data; the CLI prints the message without a traceback."""


class SourceSpecError(DataError):
    """A ``--source`` string that cannot be understood."""


class MissingFilesError(DataError):
    """A CSV names files that do not exist. One error for all of them, listing the first few."""

    def __init__(self, csv_path: Path | str, missing: list[str], show: int = 5) -> None:
        self.csv_path = str(csv_path)
        self.missing = missing
        listed = "\n".join(f"  {m}" for m in missing[:show])
        more = f"\n  ... and {len(missing) - show} more" if len(missing) > show else ""
        super().__init__(f"{len(missing)} file(s) named in {csv_path} do not exist:\n{listed}{more}")


@dataclass(frozen=True)
class Record:
    """One input image before decoding. ``path`` is absolute (or as given in the CSV when it was absolute)."""

    path: str
    label: str
    domain: str
    source: str


@dataclass
class Source:
    """A parsed source. ``records()`` lists its images; ``n_missing`` counts CSV rows whose file is absent
    (native layouts are often partially downloaded, so they skip those rows instead of failing)."""

    kind: str
    root: Path
    name: str
    options: dict[str, str] = field(default_factory=dict)
    n_missing: int = 0

    @property
    def domain(self) -> str | None:
        return self.options.get("domain")

    def records(self) -> list[Record]:
        """All images of this source in a deterministic order."""
        adapter = ADAPTERS[self.kind]
        return list(adapter(self))

    def describe(self) -> str:
        opts = "".join(f":{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.kind}:{self.root}{opts}"


LABELS_CSV_FIELDS = ["path", "label", "domain"]


def write_labels_csv(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write a labels.csv (``path,label,domain``; other keys of ``rows`` are ignored) that ``labels.csv``
    sources, ``prepare``, ``extract`` and ``index`` read back."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LABELS_CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return out


@dataclass(frozen=True)
class LabelRow:
    """One row of a labels.csv as written, with its path made absolute.

    ``path`` is ``""`` when the cell is empty (callers decide whether that is an error); ``line`` is the
    row's line number in the file, for error messages.
    """

    path: str
    label: str
    domain: str
    line: int


def read_labels_csv(path: str | os.PathLike, *, default_domain: str = "default") -> list[LabelRow]:
    """The rows of a labels.csv (``path,label[,domain]``), the one reader every stage shares.

    ``path`` may be the CSV or a folder holding ``labels.csv``. Relative image paths are resolved against
    the CSV's folder (absolute ones are kept as written); cells are stripped; an empty or absent ``domain``
    becomes ``default_domain`` (``"default"``; pass ``default_domain=""`` to keep it empty). A UTF-8 BOM is
    accepted. Whether the image files exist is not checked here. Raises :class:`DataError` when the file
    does not exist or its header lacks ``path`` or ``label``; an empty file gives no rows.
    """
    csv_path = Path(path)
    if csv_path.is_dir():
        csv_path = csv_path / "labels.csv"
    if not csv_path.is_file():
        raise DataError(f"CSV file {csv_path} does not exist")
    base = csv_path.parent
    rows: list[LabelRow] = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if header is not None and not {"path", "label"} <= set(header):
            raise DataError(f"{csv_path}: header must have columns path,label[,domain]; got {list(header)}")
        for line, row in enumerate(reader, start=2):
            rel = (row.get("path") or "").strip()
            image = Path(rel)
            resolved = "" if not rel else str(image if image.is_absolute() else base / image)
            label = (row.get("label") or "").strip()
            domain = (row.get("domain") or "").strip() or default_domain
            rows.append(LabelRow(resolved, label, domain, line))
    return rows


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _walk_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted: record order must not depend on the filesystem."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_file(f))
    return out


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{what}: folder {path} does not exist")


def _read_csv(path: Path) -> Iterator[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"CSV file {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:
        yield from csv.DictReader(f)


def _prefixed(source: Source, label: str) -> str:
    return f"{source.name}:{label}"


# ----------------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------------


def _labels_csv(source: Source) -> Iterator[Record]:
    """``path,label[,domain]``; relative paths are relative to the CSV's folder; missing files: one error."""
    csv_path = source.root
    prefix = source.options.get("prefix")
    records: list[Record] = []
    missing: list[str] = []
    for row in read_labels_csv(csv_path, default_domain=source.options.get("domain", "default")):
        if not row.path or not row.label:
            raise DataError(f"{csv_path}:{row.line}: empty path or label")
        if not Path(row.path).is_file():
            missing.append(row.path)
            continue
        domain = source.options.get("domain", row.domain)
        label = f"{prefix}:{row.label}" if prefix else row.label
        records.append(Record(row.path, label, domain, source.name))
    if missing:
        raise MissingFilesError(csv_path, missing)
    yield from records


def _imagefolder(source: Source) -> Iterator[Record]:
    """``root/<class>/**/<image>``: one folder per class (torchvision ImageFolder layout)."""
    _require_dir(source.root, "imagefolder")
    domain = source.options.get("domain", source.root.name)
    for cls in _subdirs(source.root):
        for p in _walk_images(cls):
            yield Record(str(p), _prefixed(source, cls.name), domain, source.name)


def _gldv2(source: Source) -> Iterator[Record]:
    """Google Landmarks v2: ``train.csv`` (id,url,landmark_id), images at ``[train/]a/b/c/<id>.jpg``.

    The 4.1M-row CSV is streamed and joined with the images actually on disk (the set is usually downloaded
    in part), so memory follows what is present, not what is listed.
    """
    root = source.root
    _require_dir(root, "gldv2")
    csv_path = root / source.options.get("csv", "train.csv")
    img_root = root / "train" if (root / "train").is_dir() else root
    present: dict[str, Path] = {}
    for p in _walk_images(img_root):
        stem = p.stem
        # Only files that sit where the layout says (a/b/c/ = first three characters of the id).
        if len(stem) >= 3 and p.parent.parts[-3:] == (stem[0], stem[1], stem[2]):
            present[stem] = p
    domain = source.options.get("domain", "landmarks")
    found: list[Record] = []
    listed = 0
    for row in _read_csv(csv_path):
        listed += 1
        p = present.get((row.get("id") or "").strip())
        if p is not None:
            found.append(Record(str(p), _prefixed(source, row["landmark_id"].strip()), domain, source.name))
    source.n_missing = listed - len(found)
    found.sort(key=lambda r: r.path)
    yield from found


def _products10k(source: Source) -> Iterator[Record]:
    """Products-10k: ``train.csv`` (name,class,group), images at ``train/<name>``."""
    root = source.root
    _require_dir(root, "products10k")
    csv_path = root / source.options.get("csv", "train.csv")
    img_dir = root / source.options.get("images", "train")
    domain = source.options.get("domain", "packaged_goods")
    missing = 0
    for row in _read_csv(csv_path):
        p = img_dir / row["name"].strip()
        if not p.is_file():
            missing += 1
            continue
        yield Record(str(p), _prefixed(source, row["class"].strip()), domain, source.name)
    source.n_missing = missing


def _fashion(source: Source) -> Iterator[Record]:
    """Fashion Product Images: ``styles.csv`` (id,...,articleType,...), images at ``images/<id>.jpg``.

    Some rows of the public styles.csv have unquoted commas in the last column (productDisplayName); the CSV
    reader puts the surplus fields under a spare key, so the early columns we read stay correct.
    """
    root = source.root
    _require_dir(root, "fashion")
    col = source.options.get("label", "articleType")
    csv_path = root / source.options.get("csv", "styles.csv")
    img_dir = root / source.options.get("images", "images")
    domain = source.options.get("domain", "apparel")
    missing = 0
    for row in _read_csv(csv_path):
        if col not in row:
            raise DataError(f"{csv_path}: no column {col!r} (label=); columns are {list(row)}")
        value = (row.get(col) or "").strip()
        p = img_dir / f"{(row.get('id') or '').strip()}.jpg"
        if not p.is_file():
            missing += 1
            continue
        if not value:
            continue  # an unlabeled product cannot be a positive for anything
        yield Record(str(p), _prefixed(source, value), domain, source.name)
    source.n_missing = missing


_SYNSET = re.compile(r"^n\d{8}$")


def _imagenet(source: Source) -> Iterator[Record]:
    """ImageNet: synset folders ``[train/]nXXXXXXXX/*.JPEG``."""
    root = source.root
    _require_dir(root, "imagenet")
    base = root / "train" if (root / "train").is_dir() else root
    domain = source.options.get("domain", "generic_objects")
    synsets = [d for d in _subdirs(base) if _SYNSET.match(d.name)]
    if not synsets:
        raise DataError(f"imagenet: no synset folders (nXXXXXXXX) under {base}")
    for d in synsets:
        for p in _walk_images(d):
            yield Record(str(p), _prefixed(source, d.name), domain, source.name)


def _omnibenchmark(source: Source) -> Iterator[Record]:
    """Omnibenchmark: ``<realm>/<class>/*.jpg``; the realm is the domain, labels are ``realm/class``."""
    root = source.root
    _require_dir(root, "omnibenchmark")
    for realm in _subdirs(root):
        domain = source.options.get("domain", realm.name)
        for cls in _subdirs(realm):
            for p in _walk_images(cls):
                yield Record(str(p), _prefixed(source, f"{realm.name}/{cls.name}"), domain, source.name)


ADAPTERS: dict[str, Callable[[Source], Iterator[Record]]] = {
    "labels.csv": _labels_csv,
    "imagefolder": _imagefolder,
    "gldv2": _gldv2,
    "products10k": _products10k,
    "fashion": _fashion,
    "imagenet": _imagenet,
    "omnibenchmark": _omnibenchmark,
}
ALIASES = {
    "csv": "labels.csv",
    "labels": "labels.csv",
    "folder": "imagefolder",
    "products-10k": "products10k",
}
KNOWN_OPTIONS = {"domain", "name", "prefix", "label", "csv", "images"}
_OPTION = re.compile(r"^([A-Za-z_]\w*)=(.*)$")


def parse_source(spec: str | os.PathLike | Source, default_domain: str | None = None) -> Source:
    """Parse ``KIND:PATH[:key=value...]`` (or a bare ``.csv`` path / folder with ``labels.csv``).

    ``default_domain`` (the CLI's ``--domain``) applies to ``imagefolder`` sources that set no ``domain=``.
    """
    if isinstance(spec, Source):
        return spec
    text = os.fspath(spec)
    kind = None
    rest = text
    head, sep, tail = text.partition(":")
    if sep and (head.lower() in ADAPTERS or head.lower() in ALIASES):
        kind = ALIASES.get(head.lower(), head.lower())
        rest = tail
    # Trailing ":key=value" segments are options; whatever precedes them is the path (which may contain ':').
    parts = rest.split(":")
    options: dict[str, str] = {}
    while len(parts) > 1 and _OPTION.match(parts[-1]):
        m = _OPTION.match(parts.pop())
        assert m is not None
        key, value = m.group(1), m.group(2)
        if key not in KNOWN_OPTIONS:
            raise SourceSpecError(
                f"{text!r}: unknown option {key!r}; known: {', '.join(sorted(KNOWN_OPTIONS))}"
            )
        options[key] = value
    path = Path(":".join(parts)).expanduser()
    if not str(path) or str(path) == ".":
        raise SourceSpecError(f"{text!r}: no path given")
    if kind is None:
        if path.suffix.lower() == ".csv":
            kind = "labels.csv"
        elif path.is_dir() and (path / "labels.csv").is_file():
            kind, path = "labels.csv", path / "labels.csv"
        else:
            raise SourceSpecError(
                f"{text!r}: cannot tell the source kind; write KIND:PATH with KIND one of "
                f"{', '.join(ADAPTERS)} (a bare path must be a .csv file or a folder holding labels.csv)"
            )
    if kind == "labels.csv" and path.is_dir():
        path = path / "labels.csv"
    if kind == "imagefolder" and "domain" not in options and default_domain:
        options["domain"] = default_domain
    path = path.resolve()
    if kind == "labels.csv":
        default_name = path.parent.name or "labels"
    elif kind == "imagefolder":
        default_name = path.name or "imagefolder"
    else:
        default_name = kind
    name = options.pop("name", None) or default_name
    return Source(kind=kind, root=path, name=name, options=options)


def parse_sources(specs: list, default_domain: str | None = None) -> list[Source]:
    """Parse several specs and make source names unique (``name``, ``name-2``, ...)."""
    sources = [parse_source(s, default_domain) for s in specs]
    seen: dict[str, int] = {}
    for s in sources:
        n = seen.get(s.name, 0) + 1
        seen[s.name] = n
        if n > 1:
            s.name = f"{s.name}-{n}"
    return sources
