"""Maintenance and experiment commands (data, checkpoints, the tiny demo): ``python -m tools.<name>`` from the
repo root, or the ``controlnet-*`` console commands after ``pip install -e .``."""
