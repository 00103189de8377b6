"""gptkernels: hand-written CUDA kernels for GPT training and inference in PyTorch.

Every op has a CUDA kernel (csrc/, built as gptkernels._C) and a pure-PyTorch reference; which
one runs is decided per call by gptkernels._backend (see `backend`, `set_backend`). The GPT
application built on the library lives in gptkernels.gpt (GPT, GPTConfig and
GPTForSequenceClassification are re-exported here).
"""
from gptkernels._backend import backend, get_backend, kernels_available, set_backend
from gptkernels import ops, nn  # noqa: E402  (registers the ops' fake/autograd implementations)
from gptkernels._info import info  # noqa: E402
from gptkernels._selftest import selftest  # noqa: E402  (also installs the self-test's verdicts in _backend)
from gptkernels.ops.attention import (flash_attention, flash_attention_varlen, get_attention_impl,  # noqa: E402
                                      set_attention_impl)
from gptkernels.gpt import GPT, GPTConfig, GPTForSequenceClassification  # noqa: E402

__version__ = "0.1.0"
__all__ = ["backend", "get_backend", "set_backend", "kernels_available", "info", "selftest", "set_attention_impl",
           "get_attention_impl", "flash_attention", "flash_attention_varlen",
           "ops", "nn", "GPT", "GPTConfig", "GPTForSequenceClassification"]
