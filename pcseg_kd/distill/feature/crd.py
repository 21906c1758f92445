"""CRD, contrastive representation distillation (Tian et al., 2019), NCE form with
momentum memory banks as in RepDistiller/mdistiller (T = 0.07, momentum 0.5, 128-d
embeddings, kd_weight 0.8).

Both feature sets are embedded (linear + L2 normalisation, one embedding per side and
per model) and scored against memory banks of past embeddings of all training
samples: the student's embedding against the teacher bank and the teacher's against
the student bank, at the positive (the row's own sample index) and K negatives. Each
score is exp(<·,·>/T) / Z, Z fixed at the first batch as mean score × n_data, and each
set of scores gets the NCE loss with noise distribution 1/n_data. After the loss the
banks move towards the batch's embeddings with momentum and are re-normalised.

Differences from mdistiller, on purpose: device-agnostic (mdistiller's memory only runs
on CUDA); one bank per model (seed) so seeds trained side by side never share
negatives; negatives drawn uniformly in the distiller (mdistiller's AliasMethod with
uniform weights) rather than per class by the data loader.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ...registry import DISTILLERS
from ..base import Distiller, check_number
from .common import BatchedLinear, compute_dtype, masked_mean_rows, require_feature, row_weights


def l2_normalise(x: Tensor, eps: float = 1e-12) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def gather_rows(bank: Tensor, index: Tensor) -> Tensor:
    """``bank`` ``[S, n, D]`` at ``index`` ``[S, ...]`` -> ``[S, ..., D]`` (model s reads its own bank)."""
    flat = index.reshape(index.shape[0], -1)
    out = torch.gather(bank, 1, flat.unsqueeze(-1).expand(-1, -1, bank.shape[-1]))
    return out.reshape(*index.shape, bank.shape[-1])


def crd_scores(embed: Tensor, bank_rows: Tensor, temperature: float) -> Tensor:
    """exp(<bank_rows, embed> / T): ``embed`` ``[..., N, D]``, ``bank_rows`` ``[..., N, K+1, D]``
    -> ``[..., N, K+1]`` (not yet divided by Z)."""
    return torch.exp((bank_rows * embed.unsqueeze(-2)).sum(-1) / temperature)


def crd_nce_loss(scores: Tensor, num_samples: int, eps: float = 1e-7) -> Tensor:
    """Per-row NCE loss of Z-normalised scores ``[..., N, K+1]`` (column 0 the positive):
    -[log P/(P + K/n) + Σ_k log (K/n)/(Q_k + K/n)]."""
    k = scores.shape[-1] - 1
    noise = k / num_samples
    pos, neg = scores[..., 0], scores[..., 1:]
    log_d1 = torch.log(pos / (pos + noise + eps))
    log_d0 = torch.log(noise / (neg + noise + eps))
    return -(log_d1 + log_d0.sum(-1))


def crd_loss(embed_s: Tensor, embed_t: Tensor, bank_rows_s: Tensor, bank_rows_t: Tensor,
             z_s: Tensor, z_t: Tensor, temperature: float, num_samples: int,
             eps: float = 1e-7) -> Tensor:
    """Per-row CRD loss ``[..., N]``.

    ``embed_s``/``embed_t``: normalised embeddings ``[..., N, D]``; ``bank_rows_s``/``bank_rows_t``:
    the student/teacher banks at [positive, negatives] ``[..., N, K+1, D]``; ``z_s``/``z_t``:
    normalisers broadcastable to ``[..., 1, 1]`` (the leading shape). The student
    embedding is scored against the teacher bank, the teacher embedding against the
    student bank.
    """
    out_s = crd_scores(embed_s, bank_rows_t, temperature) / z_s
    out_t = crd_scores(embed_t, bank_rows_s, temperature) / z_t
    return crd_nce_loss(out_s, num_samples, eps) + crd_nce_loss(out_t, num_samples, eps)


def momentum_update(bank: Tensor, index: Tensor, embed: Tensor, momentum: float,
                    keep: Optional[Tensor] = None) -> None:
    """In place: bank[s, index] <- normalise(momentum · bank[s, index] + (1 - momentum) · embed).
    ``bank`` ``[S, n, D]``, ``index`` ``[S, N]``, ``embed`` ``[S, N, D]``; rows where ``keep`` is
    False are left as they were."""
    with torch.no_grad():
        old = gather_rows(bank, index)
        new = l2_normalise(old * momentum + embed.to(bank.dtype) * (1.0 - momentum))
        if keep is not None:
            new = torch.where(keep.unsqueeze(-1), new, old)
        bank.scatter_(1, index.unsqueeze(-1).expand(-1, -1, bank.shape[-1]), new)


@DISTILLERS.register_module("crd")
class CRD(Distiller):
    """CE + ``kd_weight`` · CRD(student_feats, teacher_feats, index).

    ``num_negatives``: K per row (drawn with replacement from all n_data samples);
    ``feat_dim``: embedding width; ``momentum``: bank momentum; ``seed``: seed of the
    negative sampler (its generator lives on the features' device).
    """
    uses_features = True

    def __init__(self, feat_dim: int = 128, num_negatives: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5, eps: float = 1e-7, seed: int = 0, kd_weight: float = 0.8,
                 **base: Any):
        super().__init__(kd_weight=kd_weight, **base)
        if num_negatives < 1 or feat_dim < 1:
            raise ValueError(f"crd needs num_negatives >= 1 and feat_dim >= 1, got {num_negatives}, {feat_dim}")
        check_number("temperature", temperature, strict=True)
        check_number("eps", eps, strict=True)
        if not (math.isfinite(momentum) and 0 <= momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.feat_dim, self.num_negatives = feat_dim, num_negatives
        self.temperature, self.momentum, self.eps, self.seed = temperature, momentum, eps, seed
        self.embed_s: Optional[BatchedLinear] = None
        self.embed_t: Optional[BatchedLinear] = None
        self.num_samples = 0
        self._generators: Dict[str, torch.Generator] = {}
        self._z_ready = False  # Python mirror of "Z is set", so steady-state steps need no sync

    def build_modules(self, student_dim: int, teacher_dim: int, num_models: int = 1,
                      num_samples: int = 0, num_classes: int = 0) -> None:
        if num_samples < 1:
            raise ValueError("crd needs the number of training samples (build_modules(num_samples=...)) "
                             "for its memory banks; the task must provide sample indices")
        s = max(num_models, 1)
        self.num_samples = num_samples
        self._z_ready = False
        self.embed_s = BatchedLinear(s, student_dim, self.feat_dim)
        self.embed_t = BatchedLinear(s, teacher_dim, self.feat_dim)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3.0)  # RepDistiller's bank initialisation
        self.register_buffer("bank_s", torch.rand(s, num_samples, self.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("bank_t", torch.rand(s, num_samples, self.feat_dim).mul_(2 * stdv).add_(-stdv))
        # Z < 0 means "not set yet": fixed from the first training batch, per model
        self.register_buffer("z_s", torch.full((s,), -1.0))
        self.register_buffer("z_t", torch.full((s,), -1.0))

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return self._generators[key]

    def sample_contrast_index(self, index: Tensor) -> Tensor:
        """``[S, N]`` positives -> ``[S, N, K+1]`` with the positive in column 0."""
        neg = torch.randint(0, self.num_samples, (*index.shape, self.num_negatives), device=index.device,
                            generator=self._generator(index.device))
        return torch.cat([index.unsqueeze(-1), neg], -1)

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                valid: Tensor, **extras: Any) -> Tensor:
        if self.embed_s is None:
            raise RuntimeError("crd: build_modules(student_dim, teacher_dim, num_models, num_samples) was "
                               "not called before training, so there are no embeddings or memory banks")
        f_s = require_feature(extras, "student_feats", "crd")
        f_t = require_feature(extras, "teacher_feats", "crd").detach()
        index = require_feature(extras, "index", "crd").long()
        single = f_s.dim() == 2  # no leading model dim: S = 1
        if single:
            f_s, f_t, index = f_s.unsqueeze(0), f_t.unsqueeze(0), index.unsqueeze(0)
            valid = valid.unsqueeze(0) if valid is not None else None
        if index.shape != f_s.shape[:-1]:
            index = index.expand(f_s.shape[:-1])
        # checked on the device (no host sync per step); a bad index fails at the next sync
        torch._assert_async(((index >= 0) & (index < self.num_samples)).all(),
                            f"crd: sample index out of range [0, {self.num_samples})")
        dtype = compute_dtype(f_s, f_t)
        e_s = l2_normalise(self.embed_s(f_s.to(dtype)))
        e_t = l2_normalise(self.embed_t(f_t.to(dtype)))
        contrast = self.sample_contrast_index(index)
        rows_s = gather_rows(self.bank_s, contrast).to(dtype)
        rows_t = gather_rows(self.bank_t, contrast).to(dtype)
        w = row_weights(valid, e_s[..., 0])
        if self.training:
            self._set_normalisers(e_s, e_t, rows_s, rows_t, w)
        if not self._z_ready:
            if bool((self.z_s < 0).any() or (self.z_t < 0).any()):
                raise RuntimeError("crd: evaluated before any training batch fixed its normalisers Z")
            self._z_ready = True
        z_s = self.z_s.to(dtype).view(-1, 1, 1)
        z_t = self.z_t.to(dtype).view(-1, 1, 1)
        per_row = crd_loss(e_s, e_t, rows_s, rows_t, z_s, z_t, self.temperature, self.num_samples, self.eps)
        loss = masked_mean_rows(per_row, w)
        if self.training:
            keep = valid.bool() if valid is not None else None
            momentum_update(self.bank_s, index, e_s.detach(), self.momentum, keep)
            momentum_update(self.bank_t, index, e_t.detach(), self.momentum, keep)
        return loss.squeeze(0) if single else loss

    def _set_normalisers(self, e_s: Tensor, e_t: Tensor, rows_s: Tensor, rows_t: Tensor, w: Tensor) -> None:
        """Z = mean raw score (valid rows) × n_data, once per model, as RepDistiller does.

        Sync-free: the update only fills models whose Z is unset (< 0; loaded ones are kept)
        and scores are positive, so after one training batch every Z is set and the Python
        flag can say so without reading the buffers."""
        if self._z_ready:
            return
        with torch.no_grad():
            count = (w.sum(-1) * rows_s.shape[-2]).clamp_min(1.0)
            raw_s = crd_scores(e_s, rows_t, self.temperature) * w.unsqueeze(-1)
            raw_t = crd_scores(e_t, rows_s, self.temperature) * w.unsqueeze(-1)
            z_s = raw_s.sum((-1, -2)) / count * self.num_samples
            z_t = raw_t.sum((-1, -2)) / count * self.num_samples
            self.z_s.copy_(torch.where(self.z_s < 0, z_s.to(self.z_s.dtype), self.z_s))
            self.z_t.copy_(torch.where(self.z_t < 0, z_t.to(self.z_t.dtype), self.z_t))
        self._z_ready = True
