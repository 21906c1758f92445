"""Models. ``mlp`` serves the small tasks (one stacked model per seed); for SemanticKITTI,
``sparse.spunet`` is the point-cloud student, ``image.resnet_fcn`` the image teacher and
``fusion_teacher`` the image+point teacher (the last two need spconv only for the point branch)."""
from .image import ResNetFCN, sample_at_pixels  # noqa: F401
from .mlp import MLP, PlainMLP  # noqa: F401
from .sparse.spconv_compat import HAVE_SPCONV

if HAVE_SPCONV:  # optional extra: registers "spunet" and "fusion_teacher"
    from .fusion_teacher import FusionTeacher  # noqa: F401
    from .sparse.spunet import SpUNet  # noqa: F401
