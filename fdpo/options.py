"""The names each choice of the API accepts, defined once for the package, its kernels and benchmarks."""

# backend=: "auto" picks triton on CUDA (or under TRITON_INTERPRET=1), torch otherwise (fdpo.backends).
BACKENDS = ("auto", "triton", "torch", "reference")
# divergence=: the f-DPO score g(r) of docs/math.md 2.
DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
# loss=: the loss shapes of docs/math.md 3 and 4.
LOSS_SHAPES = ("sigmoid", "robust", "hinge", "ipo", "bpo")
# The loss shapes that take label_smoothing.
SMOOTHED_SHAPES = ("sigmoid", "robust")
