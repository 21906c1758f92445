"""Session-wide test setup.

Without a GPU, Triton kernels can only run under its interpreter, and Triton decides
that when a kernel is decorated (at import). Setting ``TRITON_INTERPRET=1`` here, before
any test module imports the kernels, means every module sees interpreted kernels,
whatever the collection order. With a GPU it is left alone.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
