"""Metrics: CMD (Zellinger et al., 2017) and accuracy."""
from .cmd import cmd  # noqa: F401
