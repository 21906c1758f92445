"""PSSM, the Perceptual Solution Space Mask (paper Sec. 3.3, Eq. 5-8): per-row weights Ω.

Ω_i = 1 where the gate's prediction is right; elsewhere it depends on the cosine
similarity of the teacher's and student's outputs. Two presets:

``reference`` (the authors' released code, what produced their numbers)
    gate on the *teacher's* argmax; teacher wrong -> Ω = d = (cos + 1) / 2 if cos ≥ 0.996
    else 0; outputs compared as raw logits.
``paper`` (Eq. 5-8 read literally)
    gate on the *student's* prediction; mask = 1 if d < τ else d, τ on the d scale;
    outputs compared as probabilities.

Every knob can be overridden (see :data:`PSSM_PRESETS` and ``docs/method.md``). The
weights are computed with tensor ops only: no host sync, any device, any leading dims.
The distillers that use Ω are ``pcseg_kd/distill/kd_pssm.py`` and ``dkd_pssm.py``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PSSMConfig:
    space: str = "logits"       # "logits" | "probs": what the cosine compares
    gate: str = "teacher"       # "teacher" | "student" | "both": whose correct prediction gives Ω = 1
    tau: float = 0.996          # threshold
    tau_scale: str = "cos"      # "cos": τ compares the raw cosine | "d": τ compares d = (cos+1)/2
    below: float = 0.0          # Ω where the similarity is below τ, in [0, 1] (0: drop the row; 1: keep it)
    above: str = "d"            # Ω where the similarity is at/above τ: "d" or "1"
    detach: bool = True         # stop gradients through Ω (authors' code: False)
    temperature: float = 1.0    # softmax temperature when space == "probs"

    def __post_init__(self):
        choices = {"space": ("logits", "probs"), "gate": ("teacher", "student", "both"),
                   "tau_scale": ("cos", "d"), "above": ("d", "1")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"pssm.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key, kinds in (("tau", (int, float)), ("below", (int, float)), ("temperature", (int, float)),
                           ("detach", (bool,))):
            value = getattr(self, key)
            if not isinstance(value, kinds) or (kinds != (bool,) and isinstance(value, bool)):
                raise ValueError(f"pssm.{key} must be {'a bool' if kinds == (bool,) else 'a number'}, "
                                 f"got {value!r}")
        if not 0.0 <= self.below <= 1.0:
            raise ValueError(f"pssm.below must be in [0, 1], got {self.below}")
        if self.temperature <= 0:
            raise ValueError(f"pssm.temperature must be > 0, got {self.temperature}")


PSSM_PRESETS: Dict[str, PSSMConfig] = {
    "reference": PSSMConfig(),
    "paper": PSSMConfig(space="probs", gate="student", tau=0.998, tau_scale="d", below=1.0, above="d"),
}


def pssm_config(preset: str = "reference", **overrides: Any) -> PSSMConfig:
    if preset not in PSSM_PRESETS:
        raise ValueError(f"unknown PSSM preset {preset!r}; known: {', '.join(PSSM_PRESETS)}")
    unknown = set(overrides) - set(asdict(PSSM_PRESETS[preset]))
    if unknown:
        raise ValueError(f"unknown PSSM option(s) {sorted(unknown)}; known: {sorted(asdict(PSSMConfig()))}")
    return replace(PSSM_PRESETS[preset], **overrides)


def pssm_weights(student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                       preset: str = "reference", ignore_index: Optional[int] = None,
                       **overrides: Any) -> Tensor:
    """Ω of shape ``[..., N]`` for ``[..., N, C]`` logits; rows whose target is ``ignore_index``
    get Ω = 0. ``config=`` (a :class:`PSSMConfig`) or a preset name plus knob overrides.

    The plain PyTorch semantics; :func:`pcseg_kd.distill.kernels.pssm_weights` computes the
    same Ω with backend dispatch (the fused kernel's Ω-only mode on CUDA)."""
    cfg = overrides.pop("config", None)
    if cfg is not None and overrides:
        raise ValueError(f"pssm_weights: pass either config= or knob overrides, not both ({sorted(overrides)})")
    cfg = cfg or pssm_config(preset, **overrides)
    s = student_logits.float() if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits
    t = teacher_logits.float() if teacher_logits.dtype in (torch.float16, torch.bfloat16) else teacher_logits
    if cfg.detach:
        s, t = s.detach(), t.detach()
    if cfg.space == "probs":
        o_s, o_t = F.softmax(s / cfg.temperature, -1), F.softmax(t / cfg.temperature, -1)
    else:
        o_s, o_t = s, t
    cos = F.cosine_similarity(o_t, o_s.to(o_t.dtype), dim=-1, eps=1e-8)
    d = 0.5 * (cos + 1.0)
    above = (d if cfg.tau_scale == "d" else cos) >= cfg.tau
    hi = d if cfg.above == "d" else torch.ones_like(d)
    mask = torch.where(above, hi, torch.full_like(d, cfg.below))

    teacher_right = teacher_logits.argmax(-1) == target
    student_right = student_logits.argmax(-1) == target
    right = {"teacher": teacher_right, "student": student_right,
             "both": teacher_right & student_right}[cfg.gate]
    omega = torch.where(right, torch.ones_like(mask), mask)
    if ignore_index is not None:
        omega = omega.masked_fill(target == ignore_index, 0.0)
    return omega
