"""Low-level ops: each family's reference, CUDA kernel registration (torch.library: fake, CPU
reference implementation, autograd) and its dispatching entry point. Knows nothing of any model;
gptkernels.nn builds on it."""
from gptkernels.ops.activation import bias_act
from gptkernels.ops.attention import flash_attention, flash_attention_varlen
from gptkernels.ops.loss import cross_entropy, linear_cross_entropy
from gptkernels.ops.layernorm import add_layer_norm, layer_norm
from gptkernels.ops.mlp import fused_mlp, linear_act

__all__ = ["bias_act", "flash_attention", "flash_attention_varlen", "cross_entropy", "layer_norm", "add_layer_norm",
           "linear_act", "fused_mlp", "linear_cross_entropy"]
