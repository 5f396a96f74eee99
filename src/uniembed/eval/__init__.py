"""Retrieval evaluation: GUIE mP@5 and friends, reports and figures."""
