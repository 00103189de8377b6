"""Low-level ops: each family's CUDA kernel registration (torch.library: fake, CPU reference,
autograd) and its dispatching entry point. Knows nothing of any model; gptkernels.nn builds on it."""
from gptkernels.ops.activation import bias_act

__all__ = ["bias_act"]
