#!/usr/bin/env python
"""The universality acceptance on a `make model` output: prints each check with its numbers, PASS or FAIL.

Usage::

    python scripts/check_universality.py artifacts/model      # reads artifacts/model/report.json

Exit status 0 only if all three checks pass (see ``uniembed_lab.universality``).
"""

from __future__ import annotations

import argparse
import sys

from uniembed_lab.universality import check_model_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default="artifacts/model")
    a = ap.parse_args()
    try:
        checks = check_model_dir(a.model_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for c in checks:
        print(f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}")
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
