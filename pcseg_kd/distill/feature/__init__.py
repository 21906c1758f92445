"""Feature distillers of the paper's Appendix C (FitNet, RKD, PKT, SP, CRD).

Each module holds the loss as a plain function (``fitnet_loss``, ``rkd_loss``,
``pkt_loss``, ``sp_loss``, ``crd_loss``) and a distiller registered in
:data:`pcseg_kd.registry.DISTILLERS` that reads ``student_feats`` / ``teacher_feats``
(and ``index`` for CRD) from the engine's extras. Trainable parts (FitNet's regressor,
CRD's embeddings) and CRD's memory banks are created in ``build_modules`` with one copy
per model (seed).
"""
from .common import BatchedLinear
from .fitnet import FitNet, fitnet_loss
from .rkd import RKD, pairwise_distances, rkd_loss, triplet_angles
from .pkt import PKT, pkt_loss
from .sp import SP, sp_loss
from .crd import CRD, crd_loss, crd_nce_loss, crd_scores, momentum_update

__all__ = ["BatchedLinear", "FitNet", "fitnet_loss", "RKD", "rkd_loss", "pairwise_distances",
           "triplet_angles", "PKT", "pkt_loss", "SP", "sp_loss", "CRD", "crd_loss", "crd_nce_loss",
           "crd_scores", "momentum_update"]
