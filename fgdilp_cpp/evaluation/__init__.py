"""Offline evaluation: prompt files, metrics (and, later, the scorer and the runner)."""
