"""Attention: gptkernels flash_attention vs torch SDPA's FlashAttention-2 and cuDNN backends, side by
side in one run, plus decoding over a KV cache.

Providers: "gptkernels" runs our sm80 (mma.sync) kernels, "gptkernels_sm90" our Hopper forward and
backward (TMA + wgmma; compute capability 9.0 and a build for sm_90a, else reported unavailable),
"gptkernels_det" / "gptkernels_sm90_det" (backward only) the sm80 / sm90 backward with
deterministic=True (fixed dq reduction order). The selection goes through GPTKERNELS_ATTENTION_IMPL (gptkernels.set_attention_impl), set
before every timed call.

Training grid (/work/shared/GPU.md): batch * seq = 16k tokens, heads * head_dim = 2048, bf16,
S in 512 .. 16k, D in {64, 128}, causal and full, forward and backward. TFLOP/s by FlashAttention's
formula: fwd = 4 * B * H * S^2 * D (halved when causal), bwd = 2.5 * fwd. Baseline: SDPA flash.
--quick: D128 causal S=1k and 4k, D64 causal S=1k.

Decode: one new token (Sq = 1) per sequence over a static cache of 1024 keys, Hq = Hkv = 12, D = 64
(GPT-2 124M shapes), B = 1 and 32; gptkernels (split-KV decode kernel, cache in (B, S, H, D) with
kv_lens) vs torch SDPA on the same cache. GB/s = bytes of K and V read (2 * B * 1024 * 12 * 64 * 2).
"""
import os

import torch
import torch.nn.functional as F

from benchmarks.harness import Case
from gptkernels.nn import functional as GF
from gptkernels.ops import attention as A


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]


def _train_case(S, D, causal, dev, dtype=torch.bfloat16):
    tokens, width = (16384, 2048) if dev == "cuda" else (256, 128)
    B, H = max(1, tokens // S), width // D

    def inputs():
        return [torch.randn(B, H, S, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)]

    def ours(impl, deterministic=None):
        def factory():
            if impl == "sm90" and not _sm90_runs():
                raise RuntimeError("the sm90 kernel needs compute capability 9.0 and a build for sm_90a")
            q, k, v = inputs()

            def fwd():
                if os.environ.get("GPTKERNELS_ATTENTION_IMPL") != impl:
                    A.set_attention_impl(impl)
                return GF.flash_attention(q, k, v, causal=causal, deterministic=deterministic)[0]
            return fwd, [q, k, v]
        return factory

    def sdpa(backend):
        def factory():
            from torch.nn.attention import sdpa_kernel
            q, k, v = inputs()
            be = _sdpa_backend(backend)

            def fwd():
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            fwd()  # raises here when the backend cannot run this case
            return fwd, [q, k, v]
        return factory

    fwd_flops = 4 * B * H * S * S * D / (2 if causal else 1)
    name = f"D{D} {'causal' if causal else 'full'} S{S}"
    params = {"B": B, "H": H, "S": S, "D": D, "causal": causal, "dtype": str(dtype)[6:]}
    flops = lambda mode, f=fwd_flops: f if mode == "fwd" else 2.5 * f  # noqa: E731
    sdpa_providers = {"sdpa_flash": sdpa("flash"), "sdpa_cudnn": sdpa("cudnn")}
    return [
        Case(op="attention", name=name, params=params, modes=("fwd",), baseline="sdpa_flash", flops=flops,
             providers={"gptkernels": ours("sm80"), "gptkernels_sm90": ours("sm90"), **sdpa_providers}),
        Case(op="attention", name=name, params=params, modes=("bwd",), baseline="sdpa_flash", flops=flops,
             providers={"gptkernels": ours("sm80"), "gptkernels_sm90": ours("sm90"),
                        "gptkernels_det": ours("sm80", deterministic=True),
                        "gptkernels_sm90_det": ours("sm90", deterministic=True), **sdpa_providers}),
    ]


def _sm90_runs():
    """With GPTKERNELS_ATTENTION_IMPL=sm90, would the sm90 kernel run here?"""
    old = os.environ.get("GPTKERNELS_ATTENTION_IMPL")
    try:
        A.set_attention_impl("sm90")
        return all((A.kernel_implementation(op) or "").startswith("sm90") for op in ("fwd", "bwd"))
    finally:
        if old is None:
            os.environ.pop("GPTKERNELS_ATTENTION_IMPL", None)
        else:
            os.environ["GPTKERNELS_ATTENTION_IMPL"] = old


def _decode_case(B, dev, dtype=torch.bfloat16, S_max=1024, H=12, D=64):
    def inputs():
        q = torch.randn(B, 1, H, D, device=dev, dtype=dtype)
        k = torch.randn(B, S_max, H, D, device=dev, dtype=dtype)
        v = torch.randn(B, S_max, H, D, device=dev, dtype=dtype)
        return q, k, v

    def ours():
        q, k, v = inputs()
        kv_lens = torch.full((B,), S_max, device=dev, dtype=torch.int32)
        return (lambda: GF.flash_attention(q, k, v, causal=True, layout="bshd", kv_lens=kv_lens)[0]), []

    def torch_sdpa():
        q, k, v = inputs()
        return (lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))), []

    kv_bytes = 2 * B * S_max * H * D * torch.tensor([], dtype=dtype).element_size()
    return Case(
        op="attention_decode", name=f"B{B} cache{S_max} H{H} D{D}",
        params={"B": B, "S_max": S_max, "H": H, "D": D, "dtype": str(dtype)[6:]},
        providers={"gptkernels": ours, "torch": torch_sdpa}, modes=("fwd",), baseline="torch",
        bytes=lambda mode, n=kv_bytes: n,
    )


def cases(quick: bool):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":  # a smoke test of the harness, not a benchmark
        return [*_train_case(128, 64, True, dev, torch.float32), _decode_case(1, dev, torch.float32, S_max=64)]
    if quick:
        grid = [(1024, 128, True), (4096, 128, True), (1024, 64, True)]
    else:
        grid = [(S, D, c) for D in (64, 128) for c in (True, False) for S in (512, 1024, 2048, 4096, 8192, 16384)]
    out = [case for S, D, c in grid for case in _train_case(S, D, c, dev)]
    out += [_decode_case(B, dev) for B in (1, 32)]
    return out
