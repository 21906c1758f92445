"""The distillers: each wires its config to a loss of :mod:`pcseg_kd.losses`.

One file per method, named after its paper: ``kd.py``, ``dkd.py``, ``kd_pssm.py``,
``dkd_pssm.py`` (the mask itself is :func:`pcseg_kd.losses.pssm.pssm_weights`); feature
distillers (FitNet, RKD, PKT, SP, CRD) live beside them, and ``kernels/`` holds the fused
loss kernel and the backend dispatch. All register in :data:`pcseg_kd.registry.DISTILLERS`.
The plain loss functions are re-exported here for convenience.
"""
from ..losses.dkd import dkd_loss, dkd_terms
from ..losses.kd import kd_loss
from ..losses.pssm import PSSM_PRESETS, PSSMConfig, pssm_config, pssm_weights
from ..losses.segmentation import ce_rows
from .base import Distiller, NoKD, warmup_factor
from .kd import KD
from .dkd import DKD
from .kd_pssm import KDPSSM
from .dkd_pssm import DKDPSSM, pssm_dkd_loss
from . import feature  # noqa: F401  (FitNet, RKD, PKT, SP, CRD register themselves)

__all__ = ["Distiller", "NoKD", "KD", "DKD", "KDPSSM", "DKDPSSM", "kd_loss", "dkd_loss", "dkd_terms",
           "pssm_weights", "pssm_config", "PSSMConfig", "PSSM_PRESETS", "pssm_dkd_loss", "ce_rows",
           "warmup_factor"]
