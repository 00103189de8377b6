"""Run by tests/test_loss_memory.py in a fresh process:
    python tests/_rss_step.py <vocab> <batch> <seq> <mode>
One forward + backward of a small-width GPT on the CPU; prints JSON with the growth of the
process's peak resident memory over that step (bytes). mode "model": GPT.forward(idx, targets)
(the chunked linear_cross_entropy); "full_logits": the control, logits = lm_logits(hidden) then
F.cross_entropy, which holds the (B*T, vocab) logits and their gradient."""
import json
import resource
import sys

import torch
import torch.nn.functional as F

from gptkernels import GPT, GPTConfig


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


if __name__ == "__main__":
    V, B, T, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=16))

    def step(b, t):
        idx, tgt = torch.randint(0, V, (b, t)), torch.randint(0, V, (b, t))
        if mode == "model":
            _, loss = model(idx, tgt)
        else:
            logits = model.lm_logits(model.hidden_states(idx))
            loss = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: the measured step allocates no new ones
        return float(loss.detach())

    step(1, 8)  # warm-up: lazily initialised state, gradient buffers
    before = rss_now()
    loss = step(B, T)
    print(json.dumps({"growth": max(0, peak_rss() - before), "loss": loss, "rss_before": before}))
