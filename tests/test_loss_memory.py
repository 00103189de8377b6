"""The training loss never holds the full logits: peak resident memory of one CPU training step
(forward + backward) at vocabulary 50304 against the same step at vocabulary 512.

B*T = 4096 tokens at n_embd 16, so one fp32 (4096, 50304) logits tensor is 786 MiB and every
other tensor of the step is small. GPT.forward(idx, targets) runs the LM head and the loss in
linear_cross_entropy, in row chunks: the vocab-50304 step may grow by less than one logits tensor
more than the vocab-512 step. The control, the same step through full logits and
F.cross_entropy, must grow by more than that (else the measurement could not tell). Each
measurement runs in a fresh process (ru_maxrss is a per-process high-water mark).

Measured when this test was written (MiB of growth, vocab 512 -> 50304): full logits (the loss
before linear_cross_entropy) 132 -> 3192; linear_cross_entropy with an unchunked reference path
132 -> 2406; chunked 124 -> 404.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T = 8, 512


def growth(vocab: int, mode: str) -> int:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_rss_step.py"), str(vocab), str(B), str(T), mode],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])["growth"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm and Linux's ru_maxrss")
def test_vocab_50304_step_holds_less_than_one_logits_tensor_more():
    logits_bytes = B * T * 50304 * 4
    small, big = growth(512, "model"), growth(50304, "model")
    assert big - small < logits_bytes, (f"vocab 50304 grew {big / 2**20:.0f} MiB, vocab 512 {small / 2**20:.0f} MiB; "
                                        f"one logits tensor is {logits_bytes / 2**20:.0f} MiB")
    # The control: with the full logits the same measurement sees more than one logits tensor.
    full = growth(50304, "full_logits")
    assert full - small > logits_bytes, (full, small)
