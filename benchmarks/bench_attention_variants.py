"""Attention variants (issue 16): packed variable-length batches and sliding windows, side by side
with torch's own FlashAttention-2 (SDPA's flash backend, torch.nn.attention.varlen.varlen_attn).

varlen (op "attention_varlen"): a batch of mixed lengths (a fixed list, 16k real tokens on a GPU),
causal, H = 16, D = 128, bf16. Providers: "gptkernels_varlen" (flash_attention_varlen: the kernels
once they name "varlen" in their limits, else the torch path, i.e. varlen_attn), "torch_varlen_attn"
(varlen_attn directly), "gptkernels_padded" (flash_attention on the batch right-padded to the longest
sequence: exact for the real tokens under causal, the padding computed and thrown away) and
"sdpa_flash_padded" (the same padded batch through SDPA's flash backend). Metric: tokens/s counting
only the real tokens, so padding shows as lost throughput. Baseline: sdpa_flash_padded.

window (op "attention_window"): causal attention over S = 8192 (B = 2, H = 16, D = 128, bf16) with a
sliding window of 1024 keys against full causal. Providers: "gptkernels_window" (flash_attention
window=(1023, 0)), "torch_varlen_window" (varlen_attn window_size=(1023, 0)), "gptkernels_causal"
and "sdpa_flash_causal" (full causal, the baseline). Metric: tokens/s (B * S per call).

Modes: fwd and bwd (the backward of out; lse is not used). On the CPU a tiny float32 configuration
is a smoke test of the harness (SDPA's flash backend and varlen_attn are reported unavailable there).
Run: python -m benchmarks.run --ops attention_variants [--quick]; GPU figures only come from a device
session (not run on a GPU so far).
"""
import torch
import torch.nn.functional as F

from benchmarks.harness import Case
from gptkernels.nn import functional as GF

# Mixed sequence lengths (a packed pretraining / SFT batch): 16384 tokens, longest 4096.
GPU_LENS = [4096, 3000, 2048, 1800, 1500, 1200, 1000, 700, 400, 300, 200, 140]
CPU_LENS = [40, 7, 23, 1, 16]


def _sdpa_flash():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def _varlen_case(lens, H, D, dev, dtype):
    total, top, B = sum(lens), max(lens), len(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)

    def packed():
        return [torch.randn(total, H, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)]

    def padded():
        return [torch.randn(B, top, H, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)]

    def ours_varlen():
        q, k, v = packed()
        return (lambda: GF.flash_attention_varlen(q, k, v, cu, cu, top, top, causal=True)[0]), [q, k, v]

    def torch_varlen():
        from torch.nn.attention.varlen import varlen_attn
        q, k, v = packed()
        fwd = lambda: varlen_attn(q, k, v, cu, cu, top, top, window_size=(-1, 0))  # noqa: E731
        fwd()  # raises here where it cannot run (the CPU)
        return fwd, [q, k, v]

    def ours_padded():
        q, k, v = padded()
        return (lambda: GF.flash_attention(q, k, v, causal=True, layout="bshd")[0]), [q, k, v]

    def sdpa_padded():
        leaves = padded()
        q, k, v = (t.transpose(1, 2) for t in leaves)

        def fwd():
            with _sdpa_flash():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        fwd()
        return fwd, leaves

    return Case(op="attention_varlen", name=f"{B} seqs {total} tok max{top} H{H} D{D}",
                params={"B": B, "tokens": total, "max_len": top, "padded_tokens": B * top, "H": H, "D": D,
                        "causal": True, "dtype": str(dtype)[6:]},
                providers={"gptkernels_varlen": ours_varlen, "torch_varlen_attn": torch_varlen,
                           "gptkernels_padded": ours_padded, "sdpa_flash_padded": sdpa_padded},
                modes=("fwd", "bwd"), baseline="sdpa_flash_padded", tokens=total)


def _window_case(B, S, W, H, D, dev, dtype):
    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=dev)

    def inputs():
        return [torch.randn(B, S, H, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)]

    def ours(window):
        def factory():
            q, k, v = inputs()
            return (lambda: GF.flash_attention(q, k, v, causal=True, layout="bshd", window=window)[0]), [q, k, v]
        return factory

    def torch_window():
        from torch.nn.attention.varlen import varlen_attn
        q, k, v = inputs()
        flat = [t.view(B * S, H, D) for t in (q, k, v)]
        fwd = lambda: varlen_attn(*flat, cu, cu, S, S, window_size=(W - 1, 0))  # noqa: E731
        fwd()
        return fwd, [q, k, v]

    def sdpa_causal():
        q, k, v = inputs()
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

        def fwd():
            with _sdpa_flash():
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        fwd()
        return fwd, [q, k, v]

    return Case(op="attention_window", name=f"B{B} S{S} window{W} H{H} D{D}",
                params={"B": B, "S": S, "window": W, "H": H, "D": D, "dtype": str(dtype)[6:]},
                providers={"gptkernels_window": ours((W - 1, 0)), "torch_varlen_window": torch_window,
                           "gptkernels_causal": ours((-1, -1)), "sdpa_flash_causal": sdpa_causal},
                modes=("fwd", "bwd"), baseline="sdpa_flash_causal", tokens=B * S)


def cases(quick: bool):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":  # a smoke test of the harness, not a benchmark
        return [_varlen_case(CPU_LENS, 2, 16, dev, torch.float32), _window_case(1, 64, 16, 2, 16, dev, torch.float32)]
    out = [_varlen_case(GPU_LENS, 16, 128, dev, torch.bfloat16), _window_case(2, 8192, 1024, 16, 128, dev,
                                                                              torch.bfloat16)]
    if not quick:
        out += [_varlen_case(GPU_LENS, 32, 64, dev, torch.bfloat16),
                _window_case(1, 16384, 1024, 16, 128, dev, torch.bfloat16),
                _window_case(2, 8192, 4096, 16, 128, dev, torch.bfloat16)]
    return out
