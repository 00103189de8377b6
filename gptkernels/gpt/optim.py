"""The optimizer and learning-rate schedule that pretraining and fine-tuning share."""
from __future__ import annotations

import math

import torch


def adamw(params, lr: float, weight_decay: float, device: torch.device, betas=(0.9, 0.999),
          eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (>= 2-D: Linear and embedding weights) only, not
    on biases and LayerNorm parameters; parameters without requires_grad are left out; torch's
    fused implementation on CUDA."""
    decay, no_decay, seen = [], [], set()
    for p in params:
        if p.requires_grad and id(p) not in seen:  # a tied weight once
            seen.add(id(p))
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if torch.device(device).type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kw)


class CosineSchedule:
    """lr(step) = lr * min(1, (step+1)/warmup) during warm-up, then a cosine from lr down to
    lr * min_ratio at max_steps (and flat after). `step` counts optimizer steps already taken."""

    def __init__(self, optimizer, lr: float, warmup: int, max_steps: int, min_ratio: float):
        self.optimizer, self.lr, self.warmup, self.max_steps, self.min_ratio = optimizer, lr, warmup, max_steps, min_ratio
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.max_steps - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return self.lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def _apply(self):
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step_count)

    def step(self):
        self.step_count += 1
        self._apply()

    def state_dict(self):
        return {"step_count": self.step_count, "lr": self.lr, "warmup": self.warmup, "max_steps": self.max_steps,
                "min_ratio": self.min_ratio}

    def load_state_dict(self, sd):
        # The position comes from the checkpoint, the shape of the schedule from this run's config
        # (so a resumed run may extend max_steps).
        self.step_count = int(sd["step_count"])
        self._apply()
