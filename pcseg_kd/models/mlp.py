"""The MLPs of the paper's small tasks, in two forms that compute the same function.

``PlainMLP`` is an ordinary torch module for one model; ``MLP`` stacks the weights of
S such models (``[S, in, out]``) and runs them with batched matmuls, so that all seeds
of a setting train as one model instead of a Python loop. ``MLP.from_plain`` builds the
stack from per-seed ``PlainMLP``s, so initialisation follows exactly the RNG protocol
of the per-seed code (``nn.Linear``'s default init under ``torch.manual_seed``).

Both return ``(logits, features)``: features are the penultimate activations, or the
logits themselves for a linear model (as the authors' feature distillers use them).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import MODELS

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "identity")


def _activate(x: Tensor, name: str, negative_slope: float) -> Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "leaky_relu":
        return F.leaky_relu(x, negative_slope)
    if name == "tanh":
        return torch.tanh(x)
    return x


def check_hidden(hidden: Sequence[int]) -> None:
    if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise ValueError(f"model.hidden must be a list of layer widths >= 1, got {list(hidden)}")


class PlainMLP(nn.Module):
    """One MLP: Linear (-> activation -> Linear)*."""

    def __init__(self, in_dim: int, num_classes: int, hidden: Sequence[int] = (),
                 activation: str = "relu", negative_slope: float = 0.01, final_activation: bool = False,
                 discarded_init_layers: Sequence[int] = ()):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {ACTIVATIONS}, got {activation!r}")
        check_hidden(hidden)
        dims = [in_dim, *hidden, num_classes]
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if i in discarded_init_layers:
                # the authors' sklearn network builds a Linear(a, a) it never uses before its
                # last layer; building (and dropping) one keeps torch's RNG stream identical
                nn.Linear(a, a)
            layers.append(nn.Linear(a, b))
        self.layers = nn.ModuleList(layers)
        self.activation, self.negative_slope = activation, negative_slope
        self.final_activation = final_activation

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        feats = x
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < n - 1 or self.final_activation:
                x = _activate(x, self.activation, self.negative_slope)
            if i < n - 1:
                feats = x
        return x, (feats if n > 1 else x)


@MODELS.register_module("mlp")
class MLP(nn.Module):
    """S stacked MLPs. Input ``[S, N, in]`` (or ``[1, N, in]``, shared by all S);
    output ``([S, N, C], [S, N, D])``. ``discarded_init_layers`` only matters when the
    weights come from :meth:`from_plain` (it shapes the per-seed RNG stream)."""

    injected_args = ("in_dim", "num_classes", "num_models")

    def __init__(self, in_dim: int, num_classes: int, hidden: List[int] = (), activation: str = "relu",
                 negative_slope: float = 0.01, final_activation: bool = False,
                 discarded_init_layers: List[int] = (), num_models: int = 1):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {ACTIVATIONS}, got {activation!r}")
        check_hidden(hidden)
        dims = [in_dim, *hidden, num_classes]
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(num_models, a, b)) for a, b in zip(dims[:-1], dims[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(num_models, 1, b)) for b in dims[1:])
        self.activation, self.negative_slope = activation, negative_slope
        # the authors' MNIST model also passes its logits through the activation
        self.final_activation = final_activation
        self.num_models = num_models
        self.hidden = list(hidden)

    @property
    def feature_dim(self) -> int:
        return self.weights[-1].shape[1] if len(self.weights) > 1 else self.weights[-1].shape[2]

    @classmethod
    def from_plain(cls, models: Sequence[PlainMLP]) -> "MLP":
        first = models[0]
        dims = [first.layers[0].in_features] + [l.out_features for l in first.layers]
        out = cls(dims[0], dims[-1], dims[1:-1], first.activation, first.negative_slope,
                  first.final_activation, num_models=len(models))
        with torch.no_grad():
            for i in range(len(first.layers)):
                out.weights[i].copy_(torch.stack([m.layers[i].weight.t() for m in models]))
                out.biases[i].copy_(torch.stack([m.layers[i].bias.unsqueeze(0) for m in models]))
        return out

    def to_plain(self, index: int) -> PlainMLP:
        dims = [self.weights[0].shape[1]] + [w.shape[2] for w in self.weights]
        plain = PlainMLP(dims[0], dims[-1], dims[1:-1], self.activation, self.negative_slope,
                         self.final_activation)
        with torch.no_grad():
            for i, layer in enumerate(plain.layers):
                layer.weight.copy_(self.weights[i][index].t())
                layer.bias.copy_(self.biases[i][index, 0])
        return plain

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if x.dim() != 3:
            raise ValueError(f"MLP expects [S, N, in] inputs, got shape {tuple(x.shape)}")
        if x.shape[0] != self.num_models:
            x = x.expand(self.num_models, -1, -1)
        feats = x
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < n - 1 or self.final_activation:
                x = _activate(x, self.activation, self.negative_slope)
            if i < n - 1:
                feats = x
        return x, (feats if n > 1 else x)
