"""What a run will need, estimated before anything large is built: host memory for a CPU run,
and disk space for its checkpoint. train() refuses a CPU run whose estimate exceeds the memory
available (the out-of-memory killer would end it without a word) unless force=True (`--force`),
and a run whose checkpoint would not fit on the disk.

Memory of one CPU training step, fp32 (the reference path; measured with ru_maxrss on configs
from 0.1M to 100M parameters and T from 128 to 1024, and rounded up):
  16 bytes per parameter (weights, gradients, AdamW's two moments)
  + per layer 90 bytes per (B x T x n_embd) element (linear and MLP activations, LayerNorm, GELU)
    + 9 bytes per (B x n_head x T x T) element (the reference attention's scores and probabilities)
  + 600 MB of fixed overhead (autograd, allocator, threads; beyond the imported libraries).
It overestimates a little (up to ~35% in the measurements), on purpose. On a GPU nothing is
checked: running out of GPU memory is an exception that the command reports in one line.
"""
from __future__ import annotations

import torch

from gptkernels.gpt.config import GPTConfig
from gptkernels.gpt.fs import free_space, size_text
from gptkernels.gpt.model import GPT
from gptkernels.gpt.train.config import TrainError

BYTES_PER_PARAM = 16
BYTES_PER_ACTIVATION = 90  # per layer, per element of (B, T, n_embd)
BYTES_PER_SCORE = 9  # per layer, per element of (B, n_head, T, T)
FIXED_BYTES = 600 * 10**6


def count_params(mcfg: GPTConfig) -> int:
    """Parameters of GPT(mcfg), tied ones once (built on the meta device: no memory, exact)."""
    with torch.device("meta"):
        model = GPT(mcfg)
    return sum(p.numel() for p in model.parameters())


def count_text(n: int) -> str:
    """124475904 -> "124.5M", 45312 -> "45.3K"."""
    return f"{n / 1e6:.1f}M" if n >= 10**6 else f"{n / 1e3:.1f}K"


def cpu_step_bytes(mcfg: GPTConfig, n_params: int, batch_size: int, block_size: int) -> int:
    """Estimated peak host memory of a CPU training step (see the module docstring)."""
    B, T, C, H = batch_size, block_size, mcfg.n_embd, mcfg.n_head
    per_layer = BYTES_PER_ACTIVATION * B * T * C + BYTES_PER_SCORE * B * H * T * T
    return BYTES_PER_PARAM * n_params + mcfg.n_layer * per_layer + FIXED_BYTES


def checkpoint_bytes(n_params: int) -> int:
    """ckpt.pt: weights and AdamW's two moments in fp32, plus the tokenizer and settings."""
    return 12 * n_params + 4 * 10**6


def available_ram() -> int | None:
    """Bytes of host memory this process can still use: MemAvailable, or less under a cgroup limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            room = int(limit) - usage
            avail = room if avail is None else min(avail, room)
        break
    return avail


def check_budget(cfg, mcfg: GPTConfig, device: torch.device, local_world: int, msg) -> int:
    """Refuse (TrainError) a CPU run that would not fit in memory, unless cfg.force (then a
    warning), and a run whose checkpoint would not fit on the disk of cfg.out_dir. Returns the
    number of parameters."""
    n_params = count_params(mcfg)
    need = checkpoint_bytes(n_params)
    # (an existing ckpt.pt is replaced only once the new one is complete: the new one needs room of its own)
    free_space(cfg.out_dir, need, f"the checkpoint of a {count_text(n_params)}-parameter model")
    if device.type != "cpu":
        return n_params
    est = cpu_step_bytes(mcfg, n_params, cfg.batch_size, cfg.block_size) * max(1, local_world)
    avail = available_ram()
    if avail is None or est <= avail:
        return n_params
    procs = f" for {local_world} processes" if local_world > 1 else ""
    text = (f"this run needs about {size_text(est)} of memory{procs} ({count_text(n_params)} parameters, batch "
            f"{cfg.batch_size} x {cfg.block_size} tokens), {size_text(avail)} is available")
    if cfg.force:
        msg(f"warning: {text}; going on (--force)")
        return n_params
    raise TrainError(f"{text}; choose a smaller --preset (demo, tiny) or --batch-size / --block-size, or pass "
                     f"--force to try anyway")
