"""Scaffolding for tests and acceptance scripts: a tiny GUIE-format model and a server in a subprocess."""
