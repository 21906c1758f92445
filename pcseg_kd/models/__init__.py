"""Models. ``mlp`` serves the small tasks (one stacked model per seed)."""
from .mlp import MLP, PlainMLP  # noqa: F401
