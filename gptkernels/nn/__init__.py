"""Drop-in layers (nn.Module) built on gptkernels.ops."""
from gptkernels.nn import functional

__all__ = ["functional"]
