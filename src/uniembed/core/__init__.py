"""Contracts below every stage: what two stages share lives here, so stages import downward only.

- :mod:`~uniembed.core.fsutil`: crash-safe writes and content hashes of files;
- :mod:`~uniembed.core.paths`: where the shared photo sets and default outputs live;
- :mod:`~uniembed.core.runtime`: CPU threads, ONNX Runtime sessions, weight hashes;
- :mod:`~uniembed.core.metrics`: k-NN and the retrieval metrics (mP@5 and friends);
- :mod:`~uniembed.core.splits`: which labels / photos / domains are held out;
- :mod:`~uniembed.core.run_record`: the typed ``head.pt`` that training writes and export/eval read.

Nothing in this package imports a stage package (checked by import-linter in CI).
"""
