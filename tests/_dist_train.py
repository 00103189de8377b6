"""Run under torchrun by tests/test_train.py:
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_train.py '<json list of configs>'
Initialises the process group once (gloo) and runs train() for each config in turn."""
import json
import sys

import torch.distributed as dist

from gptkernels.gpt.train import TrainConfig, train

if __name__ == "__main__":
    dist.init_process_group("gloo")
    for cfg in json.loads(sys.argv[1]):
        train(TrainConfig(**cfg), log=lambda s: None)
    dist.destroy_process_group()
