"""Data: the small cross-modal tasks and (in ``kitti/``) the SemanticKITTI pipeline."""
from . import gaussian, sklearn_task, mnist_task  # noqa: F401  (register the small tasks)
from . import kitti  # noqa: F401  (registers the "semantickitti" dataset)
from .toy import ToyTask  # noqa: F401
