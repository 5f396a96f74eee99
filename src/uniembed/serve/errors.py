"""The index's user-facing errors, kept apart so every serve module can raise them without import cycles."""

from __future__ import annotations

from uniembed.core.integrity import DamagedFileError


class ImageIndexError(RuntimeError):
    """A clear, user-facing problem with an index directory or its inputs (not a bug)."""


class ModelMismatchError(ImageIndexError):
    """The index was built with a different model than the one given: its vectors are not comparable."""


class DamagedIndexError(ImageIndexError, DamagedFileError):
    """A file of an index directory is missing, truncated or garbled: rebuild the index."""
