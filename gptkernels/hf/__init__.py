"""gptkernels for Hugging Face transformers models.

    import gptkernels.hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="gptkernels")  # attention only
    gptkernels.hf.patch(model)       # LayerNorm, GELU/ReLU MLPs, attention, loss: in place

Importing this module registers "gptkernels" with transformers' AttentionInterface (and its mask
interface), so `attn_implementation="gptkernels"` and `model.set_attn_implementation("gptkernels")`
route attention through gptkernels.ops.flash_attention (gptkernels/hf/attention.py).

`patch(model, *, layer_norm=True, mlp=True, attention=True, cross_entropy=True)` does, in place and
keeping every parameter object (gptkernels/hf/patching.py):
- every torch.nn.LayerNorm -> gptkernels' LayerNorm (layers.py);
- GELU/ReLU MLPs of known forms -> the fused MLP / bias+activation kernels (layers.py);
- attention -> "gptkernels" (GPT-Neo, which has its own attention class, per module);
- the causal-LM loss -> linear_cross_entropy from the hidden states when training with labels
  (loss.py): the [N, vocab] logits are never formed and `logits` is None in that output.
It records what it did in `model.gptkernels_patched`.

transformers is imported here, not by `import gptkernels`: it is not a dependency of the package.
"""
from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("gptkernels.hf needs the `transformers` package (pip install transformers)") from e

from gptkernels.hf.attention import NAME as ATTN_IMPLEMENTATION, register
from gptkernels.hf.patching import PatchReport, patch

register()

__all__ = ["patch", "PatchReport", "register", "ATTN_IMPLEMENTATION"]
