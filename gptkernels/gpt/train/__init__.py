"""Pretraining: `gptkernels train`.

  config.py      TrainConfig (every option), the presets, TrainError
  run_setup.py   the process (torchrun), data, model (DDP / FSDP2 per Block), optimizer, resume state
  loop.py        train(): the steps, evaluation, samples, checkpoints, logs
  metrics.py     metrics.jsonl and loss.png
"""
from gptkernels.gpt.train.config import PRESETS, TrainConfig, TrainError
from gptkernels.gpt.train.loop import TrainResult, train

__all__ = ["PRESETS", "TrainConfig", "TrainError", "TrainResult", "train"]
