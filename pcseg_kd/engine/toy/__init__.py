"""The small tasks (Gaussian, sklearn, MNIST/digits): every seed of a setting trained as one batched model; sweeps over a shift axis."""
