"""Data: the small cross-modal tasks and (in ``kitti/``) the SemanticKITTI pipeline."""
from . import gaussian, sklearn_task  # noqa: F401  (register tasks)
from .toy import ToyTask  # noqa: F401
