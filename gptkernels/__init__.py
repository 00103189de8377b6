"""gptkernels: hand-written CUDA kernels for GPT training and inference in PyTorch.

Every op has a CUDA kernel (csrc/, built as gptkernels._C) and a pure-PyTorch reference; which
one runs is decided per call by gptkernels._backend (see `backend`, `set_backend`).
"""
from gptkernels._backend import backend, get_backend, kernels_available, set_backend
from gptkernels import ops, nn  # noqa: E402  (registers the ops' fake/autograd implementations)
from gptkernels._info import info  # noqa: E402
from gptkernels.ops.attention import get_attention_impl, set_attention_impl  # noqa: E402
from gptkernels.model import GPT, GPTConfig, GPTForSequenceClassification  # noqa: E402

__version__ = "0.1.0"
__all__ = ["backend", "get_backend", "set_backend", "kernels_available", "info", "set_attention_impl",
           "get_attention_impl", "ops", "nn", "GPT", "GPTConfig",
           "GPTForSequenceClassification"]
