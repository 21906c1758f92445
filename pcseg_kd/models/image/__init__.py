"""2D image networks for the cross-modal teachers: a ResNet-FCN and per-point pixel sampling."""
from .sampling import sample_at_pixels  # noqa: F401
from .resnet_fcn import ResNetFCN  # noqa: F401
