"""Source adapters on tiny trees in each native layout, spec parsing, and the missing-files error."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uniembed.data.sources import (
    DataError,
    LabelRow,
    MissingFilesError,
    SourceSpecError,
    parse_source,
    parse_sources,
    read_labels_csv,
)


def write_jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_labels_csv_relative_and_absolute(tmp_path: Path) -> None:
    a = write_jpeg(tmp_path / "set" / "img" / "a.jpg")
    b = write_jpeg(tmp_path / "elsewhere" / "b.jpg", 1)
    csv_path = write_csv(
        tmp_path / "set" / "labels.csv",
        ["path", "label", "domain"],
        [["img/a.jpg", "x:1", "toys"], [str(b), "x:2", ""]],
    )
    src = parse_source(str(csv_path))
    assert src.kind == "labels.csv" and src.name == "set"
    recs = src.records()
    assert [r.path for r in recs] == [str(a), str(b)]
    assert [r.label for r in recs] == ["x:1", "x:2"]
    assert [r.domain for r in recs] == ["toys", "default"]
    assert {r.source for r in recs} == {"set"}
    # A folder holding labels.csv, options, and prefix=.
    src2 = parse_source(f"labels.csv:{tmp_path / 'set'}:prefix=p:domain=d:name=mine")
    recs2 = src2.records()
    assert src2.name == "mine" and [r.label for r in recs2] == ["p:x:1", "p:x:2"]
    assert {r.domain for r in recs2} == {"d"}


def test_labels_csv_missing_files_one_error(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "ok.jpg")
    rows = [["ok.jpg", "a", "d"]] + [[f"gone_{i}.jpg", "a", "d"] for i in range(8)]
    csv_path = write_csv(tmp_path / "labels.csv", ["path", "label", "domain"], rows)
    with pytest.raises(MissingFilesError) as info:
        parse_source(csv_path).records()
    msg = str(info.value)
    assert msg.startswith("8 file(s) named in")
    assert "gone_0.jpg" in msg and "gone_4.jpg" in msg and "gone_5.jpg" not in msg
    assert "and 3 more" in msg
    assert len(info.value.missing) == 8


def test_labels_csv_bad_header(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "labels.csv", ["file", "class"], [["a.jpg", "x"]])
    with pytest.raises(DataError, match="header must have columns"):
        parse_source(csv_path).records()


def test_read_labels_csv_shared_reader(tmp_path: Path) -> None:
    """The one labels.csv reader of every stage: paths resolved against the CSV's folder, cells stripped,
    an empty domain -> ``default_domain``, files not checked, a folder means its labels.csv."""
    absolute = str(tmp_path / "elsewhere" / "x.jpg")
    rows = [[" a/1.jpg ", " lab ", " dom "], [absolute, "lab", ""], ["", "lab2", "d"]]
    csv_path = write_csv(tmp_path / "set" / "labels.csv", ["path", "label", "domain"], rows)
    got = read_labels_csv(csv_path)
    assert got == [
        LabelRow(str(tmp_path / "set" / "a" / "1.jpg"), "lab", "dom", 2),
        LabelRow(absolute, "lab", "default", 3),
        LabelRow("", "lab2", "d", 4),
    ]
    assert read_labels_csv(tmp_path / "set") == got
    assert [r.domain for r in read_labels_csv(csv_path, default_domain="")] == ["dom", "", "d"]
    no_domain = write_csv(tmp_path / "nd.csv", ["path", "label"], [["b.jpg", "x"]])
    assert read_labels_csv(no_domain) == [LabelRow(str(tmp_path / "b.jpg"), "x", "default", 2)]
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffpath,label\nc.jpg,y\n".encode())
    assert read_labels_csv(bom)[0].label == "y"
    header_only = write_csv(tmp_path / "ho.csv", ["path", "label"], [])
    assert read_labels_csv(header_only) == []
    with pytest.raises(DataError, match="header must have columns"):
        read_labels_csv(write_csv(tmp_path / "bad.csv", ["file", "class"], []))
    with pytest.raises(DataError, match="does not exist"):
        read_labels_csv(tmp_path / "absent.csv")


def test_imagefolder(tmp_path: Path) -> None:
    root = tmp_path / "toys"
    write_jpeg(root / "bear" / "1.jpg")
    write_jpeg(root / "bear" / "sub" / "2.png")
    write_jpeg(root / "car" / "1.jpeg")
    (root / "car" / "notes.txt").write_text("not an image")
    recs = parse_source(f"imagefolder:{root}").records()
    assert [r.label for r in recs] == ["toys:bear", "toys:bear", "toys:car"]
    assert {r.domain for r in recs} == {"toys"}
    recs = parse_source(f"imagefolder:{root}:domain=kids:name=tf").records()
    assert {r.domain for r in recs} == {"kids"} and recs[0].label == "tf:bear"
    assert parse_source(f"imagefolder:{root}", default_domain="household").domain == "household"


def test_gldv2(tmp_path: Path) -> None:
    root = tmp_path / "gld"
    ids = {"abc0001": 7, "abd0002": 7, "f120003": 9, "zzz9999": 9}
    for i, img_id in enumerate(list(ids)[:3]):  # the last listed image was never downloaded
        write_jpeg(root / "train" / img_id[0] / img_id[1] / img_id[2] / f"{img_id}.jpg", i)
    write_jpeg(root / "train" / "x" / "y" / "stray.jpg")  # not where the layout says: ignored
    write_csv(root / "train.csv", ["id", "url", "landmark_id"], [[k, "http://x", v] for k, v in ids.items()])
    src = parse_source(f"gldv2:{root}")
    recs = src.records()
    assert sorted((Path(r.path).stem, r.label) for r in recs) == [
        ("abc0001", "gldv2:7"),
        ("abd0002", "gldv2:7"),
        ("f120003", "gldv2:9"),
    ]
    assert {r.domain for r in recs} == {"landmarks"}
    assert src.n_missing == 1


def test_gldv2_without_train_folder(tmp_path: Path) -> None:
    root = tmp_path / "gld"
    write_jpeg(root / "0" / "1" / "2" / "012aa.jpg")
    write_csv(root / "train.csv", ["id", "url", "landmark_id"], [["012aa", "u", 5]])
    assert [r.label for r in parse_source(f"gldv2:{root}").records()] == ["gldv2:5"]


def test_products10k(tmp_path: Path) -> None:
    root = tmp_path / "p10k"
    write_jpeg(root / "train" / "0.jpg")
    write_jpeg(root / "train" / "1.jpg", 1)
    write_csv(
        root / "train.csv", ["name", "class", "group"], [["0.jpg", 3, 0], ["1.jpg", 4, 0], ["2.jpg", 4, 0]]
    )
    src = parse_source(f"products10k:{root}")
    recs = src.records()
    assert [r.label for r in recs] == ["products10k:3", "products10k:4"]
    assert {r.domain for r in recs} == {"packaged_goods"}
    assert src.n_missing == 1


def test_fashion_label_column_and_unquoted_commas(tmp_path: Path) -> None:
    root = tmp_path / "fashion"
    for i in (15970, 39386, 59263):
        write_jpeg(root / "images" / f"{i}.jpg", i)
    header = (
        "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"
    )
    lines = [
        header,
        "15970,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual,Turtle Check Men Navy Blue Shirt",
        "39386,Men,Apparel,Bottomwear,Jeans,Blue,Summer,2012,Casual,Peter England Men Party Blue Jeans",
        "59263,Women,Accessories,Watches,Watches,Silver,Winter,2016,Casual,Titan Women, Silver, Watch",
        "11111,Women,Accessories,Watches,Watches,Silver,Winter,2016,Casual,image never downloaded",
    ]
    (root / "styles.csv").write_text("\n".join(lines) + "\n")
    src = parse_source(f"fashion:{root}")
    recs = src.records()
    assert [r.label for r in recs] == ["fashion:Shirts", "fashion:Jeans", "fashion:Watches"]
    assert src.n_missing == 1 and {r.domain for r in recs} == {"apparel"}
    recs = parse_source(f"fashion:{root}:label=masterCategory").records()
    assert [r.label for r in recs] == ["fashion:Apparel", "fashion:Apparel", "fashion:Accessories"]
    with pytest.raises(DataError, match="no column 'colour'"):
        parse_source(f"fashion:{root}:label=colour").records()


def test_imagenet(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    write_jpeg(root / "train" / "n01440764" / "n01440764_10026.JPEG")
    write_jpeg(root / "train" / "n01443537" / "n01443537_1.JPEG")
    write_jpeg(root / "train" / "README" / "x.JPEG")  # not a synset folder
    recs = parse_source(f"imagenet:{root}").records()
    assert [r.label for r in recs] == ["imagenet:n01440764", "imagenet:n01443537"]
    with pytest.raises(DataError, match="no synset folders"):
        parse_source(f"imagenet:{tmp_path / 'imagenet' / 'train' / 'README'}").records()


def test_omnibenchmark(tmp_path: Path) -> None:
    root = tmp_path / "omni"
    write_jpeg(root / "aves" / "robin" / "1.jpg")
    write_jpeg(root / "aves" / "robin" / "2.jpg")
    write_jpeg(root / "device" / "phone" / "1.jpg")
    recs = parse_source(f"omnibenchmark:{root}").records()
    assert [(r.label, r.domain) for r in recs] == [
        ("omnibenchmark:aves/robin", "aves"),
        ("omnibenchmark:aves/robin", "aves"),
        ("omnibenchmark:device/phone", "device"),
    ]


def test_spec_parsing(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "d" / "labels.csv", ["path", "label"], [])
    assert parse_source(str(csv_path)).kind == "labels.csv"
    assert parse_source(tmp_path / "d").root == csv_path.resolve()
    src = parse_source("fashion:/data/fashion:label=articleType:domain=apparel")
    assert (src.kind, str(src.root), src.options) == (
        "fashion",
        "/data/fashion",
        {"label": "articleType", "domain": "apparel"},
    )
    assert parse_source("csv:/a/b.csv").kind == "labels.csv"
    with pytest.raises(SourceSpecError, match="cannot tell the source kind"):
        parse_source(str(tmp_path))
    with pytest.raises(SourceSpecError, match="unknown option"):
        parse_source("gldv2:/x:colour=red")
    with pytest.raises(DataError, match="does not exist"):
        parse_source(f"products10k:{tmp_path / 'nothing'}").records()


def test_duplicate_source_names_made_unique() -> None:
    srcs = parse_sources(["gldv2:/a", "gldv2:/b", "gldv2:/c:name=x"])
    assert [s.name for s in srcs] == ["gldv2", "gldv2-2", "x"]
