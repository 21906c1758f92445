"""Distillation losses (plain functions) and the distillers that wire config to them.

One file per method, named after its paper: ``kd.py``, ``dkd.py``, ``pssm.py`` (the
mask), ``kd_pssm.py``, ``dkd_pssm.py``; feature distillers (FitNet, RKD, PKT, SP, CRD)
live beside them. All register in :data:`pcseg_kd.registry.DISTILLERS`.
"""
from .base import Distiller, NoKD, ce_rows, warmup_factor
from .kd import KD, kd_loss
from .dkd import DKD, dkd_loss, dkd_terms
from .pssm import PSSM_PRESETS, PSSMConfig, pssm_config, pssm_weights, pssm_weights_torch
from .kd_pssm import KDPSSM
from .dkd_pssm import DKDPSSM, pssm_dkd_loss
from . import feature  # noqa: F401  (FitNet, RKD, PKT, SP, CRD register themselves)

__all__ = ["Distiller", "NoKD", "KD", "DKD", "KDPSSM", "DKDPSSM", "kd_loss", "dkd_loss", "dkd_terms",
           "pssm_weights", "pssm_weights_torch", "pssm_config", "PSSMConfig", "PSSM_PRESETS", "pssm_dkd_loss", "ce_rows",
           "warmup_factor"]
