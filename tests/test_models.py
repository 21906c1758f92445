"""The stacked MLP computes exactly what its per-seed PlainMLPs compute."""
import pytest
import torch

from pcseg_kd.models.mlp import MLP, PlainMLP


@pytest.mark.parametrize("hidden,act,final", [([], "relu", False), ([16, 8], "relu", False),
                                              ([12], "leaky_relu", True), ([6, 6], "tanh", False)])
def test_stacked_equals_plain(hidden, act, final):
    torch.manual_seed(0)
    plains = [PlainMLP(5, 3, hidden, act, 0.2, final) for _ in range(4)]
    stacked = MLP.from_plain(plains)
    x = torch.randn(4, 7, 5)
    logits, feats = stacked(x)
    for i, p in enumerate(plains):
        ref_logits, ref_feats = p(x[i])
        torch.testing.assert_close(logits[i], ref_logits)
        torch.testing.assert_close(feats[i], ref_feats)
    assert feats.shape[-1] == stacked.feature_dim == (hidden[-1] if hidden else 3)
    if final and act == "leaky_relu":
        # LeakyReLU on the logits: no logit below slope * its pre-activation
        pre = torch.baddbmm(stacked.biases[-1], torch.nn.functional.leaky_relu(
            torch.baddbmm(stacked.biases[0], x, stacked.weights[0]), 0.2), stacked.weights[-1])
        torch.testing.assert_close(logits, torch.nn.functional.leaky_relu(pre, 0.2))
    # shared input [1, N, D] is broadcast to every model; round trip through to_plain
    shared = torch.randn(1, 7, 5)
    torch.testing.assert_close(stacked(shared)[0][2], stacked.to_plain(2)(shared[0])[0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="activation"):
        PlainMLP(3, 2, [4], activation="gelu")
    with pytest.raises(ValueError, match=r"\[S, N, in\]"):
        MLP(3, 2, num_models=2)(torch.randn(5, 3))
