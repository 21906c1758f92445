"""Fused loss kernels and backend dispatch (see ``docs/loss_kernel.md``).

``distill_loss`` is the single entry point (DKD or KD, optional PSSM Ω, optional per-row
weight, ``ignore_index``); the distillers and ``pssm_dkd_loss`` call it. Backends: ``torch``
(eager reference), ``compile`` (torch.compile, dynamic rows), ``triton`` (fused kernel);
``auto`` = triton on CUDA when available, else torch. Force one with the ``backend=``
argument, :func:`set_loss_backend` / :func:`loss_backend`, or ``PCSEG_KD_LOSS_BACKEND``.
"""
from .dispatch import (BACKENDS, ENV_VAR, distill_loss, loss_backend, pssm_weights, requested_backend,
                       select_backend, set_loss_backend, triton_can_run)


def __getattr__(name):
    if name == "HAVE_TRITON":  # imported on demand: importing pcseg_kd must not import triton
        from .pssm_dkd_triton import HAVE_TRITON
        return HAVE_TRITON
    raise AttributeError(name)

__all__ = ["BACKENDS", "ENV_VAR", "HAVE_TRITON", "distill_loss", "loss_backend", "pssm_weights",
           "requested_backend", "select_backend", "set_loss_backend", "triton_can_run"]
