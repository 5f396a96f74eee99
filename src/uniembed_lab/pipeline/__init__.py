"""The end-to-end jobs behind `uniembed demo` (demo.py) and `uniembed model` (model.py, report.py).

Both chain the library's stage functions (prepare -> extract -> train -> evaluate -> export -> index/search);
each stage stays a plain files-in/files-out function, so these modules hold only the order and the reporting.
"""

from __future__ import annotations

from uniembed_lab.pipeline.common import METHOD_LABELS, StepTimer, baselines_for, mp5_table
from uniembed_lab.pipeline.demo import run_demo, subset_labels_csv
from uniembed_lab.pipeline.model import ADAPT_SPECS, build_model
from uniembed_lab.pipeline.report import PHOTO_FRACTION

__all__ = [
    "ADAPT_SPECS",
    "METHOD_LABELS",
    "PHOTO_FRACTION",
    "StepTimer",
    "baselines_for",
    "build_model",
    "mp5_table",
    "run_demo",
    "subset_labels_csv",
]
