"""Drop-in layers (nn.Module) and the functional API, built on gptkernels.ops."""
from gptkernels.nn import functional
from gptkernels.nn.modules import CrossEntropyLoss, FusedMLP, LayerNorm

__all__ = ["functional", "LayerNorm", "FusedMLP", "CrossEntropyLoss"]
