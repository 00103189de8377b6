"""Shared by the training / CLI tests: a tiny dataset made from a few standard-library files."""
import os

from gptkernels.gpt import data
from gptkernels.gpt.train import TrainConfig


def make_tiny_dataset(out: str, n_files: int = 24, vocab_size: int = 512) -> str:
    files = data.stdlib_files("top")[:n_files]
    data.prepare(files, out, vocab_size=vocab_size, val_fraction=0.1, progress=False, log=lambda s: None)
    return out


def tiny_cfg(data_dir: str, out_dir: str, **kw) -> TrainConfig:
    base = dict(data=data_dir, out_dir=out_dir, n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4,
                max_steps=12, lr=3e-3, warmup_steps=2, eval_interval=6, eval_samples=8, log_interval=1,
                ckpt_interval=6, sample_tokens=8, progress=False, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(out_dir: str):
    import json
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
