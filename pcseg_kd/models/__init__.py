"""Models. ``mlp`` serves the small tasks (one stacked model per seed); for SemanticKITTI,
``sparse.spunet`` is the point-cloud student, ``image.resnet_fcn`` the image teacher and
``fusion_teacher`` the image+point teacher (the last two need a sparse backend, spconv or
spconv-Triton, only for the point branch: ``sparse.backend``)."""
from .image import ResNetFCN, sample_at_pixels  # noqa: F401
from .mlp import MLP, PlainMLP  # noqa: F401
from .sparse.backend import any_sparse_backend
from .sparse.spconv_compat import spconv_missing_message

if any_sparse_backend():  # optional extras: registers "spunet" and "fusion_teacher"
    from .fusion_teacher import FusionTeacher  # noqa: F401
    from .sparse.spunet import SpUNet  # noqa: F401
else:  # known names: building one says spconv is missing and how to install it
    from ..registry import MODELS as _MODELS

    for _name in ("spunet", "fusion_teacher"):
        _MODELS.register_unavailable(_name, spconv_missing_message(f"model type {_name!r}"))
