"""uniembed_lab: the lab app beside the library (as open_clip_train is beside open_clip).

What builds and checks the project's own model, not what a user imports: the end-to-end jobs
(``uniembed demo``, ``uniembed model``), benchmarks (``uniembed bench``), the universality acceptance checks,
the ImageNet weight check and test scaffolding (a tiny GUIE model, a background server). It uses the library
(``uniembed``); the library never imports it.
"""
