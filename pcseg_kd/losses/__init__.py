"""Loss functions as plain PyTorch functions: the math, with no config and no backend choice.

``kd.py`` (kd_loss), ``dkd.py`` (dkd_loss, dkd_terms), ``pssm.py`` (pssm_weights: where the
mask gets computed), ``segmentation.py`` (cross entropy with class weights, Lovász-softmax),
``class_weights.py`` (2DPASS's inverse-frequency weights), ``reduce.py`` (row reductions).
The distillers in :mod:`pcseg_kd.distill` wire config to these; the fused kernels in
:mod:`pcseg_kd.distill.kernels` compute the same values faster.
"""
from .dkd import dkd_loss, dkd_terms
from .kd import kd_loss
from .pssm import PSSM_PRESETS, PSSMConfig, pssm_config, pssm_weights
from .segmentation import ce_rows

__all__ = ["kd_loss", "dkd_loss", "dkd_terms", "pssm_weights", "pssm_config", "PSSMConfig", "PSSM_PRESETS", "ce_rows"]
