"""Shared test helpers: tolerances derived from the dtype, NaN poisoning, op lists, a tiny GPT."""
import torch

from gptkernels._selftest.rule import UNIT_ROUNDOFF  # noqa: F401  (the error of one rounding, relative)


def elementwise_tol(dtype, ops: int = 4):
    """(atol, rtol) for an elementwise result stored in `dtype` from fp32 math: one final rounding
    (unit roundoff u) plus a few fp32 operations; floored so fp32 transcendental differences
    (tanhf/erff vs torch, ~1e-6 relative) pass."""
    u = UNIT_ROUNDOFF[dtype]
    rtol = max(2 * u, ops * 2.0**-23)
    return rtol, rtol


def reduction_tol(dtype, n: int):
    """rtol for a sum of n terms accumulated in fp32 and stored in `dtype`: the final rounding plus
    fp32 accumulation error that grows like sqrt(n) * 2^-24 for random signs (bounded generously
    by 8x that)."""
    return 2 * UNIT_ROUNDOFF[dtype] + 8 * (max(n, 1) ** 0.5) * 2.0**-24


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (or -1 for integer tensors) so an unwritten element fails the comparison."""
    return t.fill_(float("nan") if t.is_floating_point() else -1)


def assert_close(actual, expected, atol, rtol, name="output"):
    """Compare with torch.testing.assert_close, naming the tensor in the message."""
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def peaked_gpt(vocab_size: int, block_size: int, **kw):
    """A tiny seed-0 GPT in eval mode (2 layers, 4 heads, 32 wide unless kw says otherwise) whose block
    weights are 4x the init: peaked, varied next-token distributions for the generation tests."""
    from gptkernels import GPT, GPTConfig

    torch.manual_seed(0)
    d = dict(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=4, n_embd=32)
    d.update(kw)
    model = GPT(GPTConfig(**d))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("transformer.h."):
                p.mul_(4.0)
    return model.eval()
