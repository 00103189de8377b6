"""Sequence classification on a GPT body: GPTForSequenceClassification (fine-tuning)."""
from __future__ import annotations

import torch
from torch import nn

from gptkernels.gpt.checkpoint import clean_gpt_state_dict
from gptkernels.gpt.config import GPTConfig
from gptkernels.gpt.model import GPT
from gptkernels.nn.functional import cross_entropy, linear_act


class GPTForSequenceClassification(nn.Module):
    """A GPT body and a linear classifier on the final hidden state of each sequence's last real
    token (with causal attention, the one position that has seen the whole sequence).

    Batches are right-padded. The pooled position of row b is, in order of precedence:
    lengths[b] - 1; the last 1 of attention_mask[b] (ones then zeros); the last token that is not
    pad_token_id; else the last position. forward(idx, targets=None, attention_mask=None,
    lengths=None) -> (logits (B, num_classes), mean cross-entropy loss or None).

    The body is a GPT (self.gpt); load pretrained weights with from_gpt(gpt, ...) (shares that
    model's modules), from_pretrained(hf_dir, ...) or load_gpt_state_dict(our GPT state_dict).
    The GPT's LM head is not used (when untied, its weights get no gradient).
    """

    def __init__(self, config: GPTConfig, num_classes: int, pad_token_id: int | None = None,
                 body: GPT | None = None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
        if pad_token_id is not None and not 0 <= pad_token_id < config.vocab_size:
            raise ValueError(f"pad_token_id: expected a token id in [0, {config.vocab_size}), got {pad_token_id!r}")
        if body is not None and body.config != config:
            raise ValueError("body: its config differs from the config given")
        self.config, self.num_classes, self.pad_token_id = config, num_classes, pad_token_id
        self.gpt = body if body is not None else GPT(config)
        self.drop = nn.Dropout(config.dropout)
        self.score = nn.Linear(config.n_embd, num_classes)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.score.bias)

    @classmethod
    def from_gpt(cls, gpt: GPT, num_classes: int, pad_token_id: int | None = None):
        """Wrap a (pretrained) GPT; its modules are shared, not copied."""
        return cls(gpt.config, num_classes, pad_token_id, body=gpt)

    @classmethod
    def from_pretrained(cls, path, num_classes: int, pad_token_id: int | None = None, dropout: float = 0.0):
        """The body from a Hugging Face GPT-2 checkpoint directory (GPT.from_pretrained), a fresh
        classifier; returned in train mode, ready to fine-tune."""
        return cls.from_gpt(GPT.from_pretrained(path, dropout=dropout), num_classes, pad_token_id).train()

    def load_gpt_state_dict(self, state_dict: dict, strict: bool = True):
        """Load a GPT's state_dict (our checkpoint format; see clean_gpt_state_dict) into the body."""
        return self.gpt.load_state_dict(clean_gpt_state_dict(state_dict, self.config.tie_embeddings), strict=strict)

    def pooled_positions(self, idx, attention_mask=None, lengths=None) -> torch.Tensor:
        """(B,) index of the position each row is classified from (see the class docstring)."""
        B, T = idx.shape
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=idx.device).long()
            if lengths.shape != (B,):
                raise ValueError(f"lengths: expected shape ({B},), got {tuple(lengths.shape)}")
            if bool(((lengths < 1) | (lengths > T)).any()):
                raise ValueError(f"lengths: expected values in [1, {T}], got {lengths.tolist()}")
            return lengths - 1
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != idx.shape:
                raise ValueError(f"attention_mask: expected shape {tuple(idx.shape)} like idx")
            mask = attention_mask.bool()
            n = mask.sum(1)
            if bool((n == 0).any()):
                raise ValueError("attention_mask: every row needs at least one 1")
            if bool((mask != (torch.arange(T, device=idx.device) < n[:, None])).any()):
                raise ValueError("attention_mask: expected right padding (ones, then zeros)")
            return n - 1
        if self.pad_token_id is not None:
            real = idx != self.pad_token_id
            if bool((~real.any(1)).any()):
                raise ValueError(f"idx: a row consists only of pad_token_id={self.pad_token_id}")
            return T - 1 - real.flip(1).long().argmax(1)  # the last non-pad token
        return torch.full((B,), T - 1, device=idx.device, dtype=torch.long)

    def forward(self, idx, targets=None, attention_mask=None, lengths=None):
        self.gpt._check_idx(idx)
        last = self.pooled_positions(idx, attention_mask, lengths)
        h = self.gpt.hidden_states(idx)
        pooled = h[torch.arange(idx.shape[0], device=idx.device), last]
        logits = linear_act(self.drop(pooled), self.score.weight, self.score.bias)
        loss = None
        if targets is not None:
            loss = cross_entropy(logits, targets, ignore_index=-100)
        return logits, loss
