"""The GPT application built on the gptkernels library (gptkernels.ops, gptkernels.nn).

  config.py       GPTConfig
  model.py        GPT: attention, Block, the model; forward, loss, sizes
  documents.py    document masking: a packed batch's cu_seqlens and positions (split_documents)
  generate.py     GPT.generate: batched prompts, sampling, EOS
  decode.py       the fixed-shape decode step: KV cache, sampling on the device, per-call state
  cuda_graph.py   the decode step captured as a CUDA graph, kept per model and shape
  hf_gpt2.py      reading a Hugging Face GPT-2 folder (GPT.from_pretrained)
  classifier.py   GPTForSequenceClassification
  checkpoint.py   checkpoint files: atomic save, safe load, load_model (checkpoint or HF folder)
  atomic.py       writing a file atomically (temp file + rename)
  device.py       device resolution, autocast precision, GPU peak FLOP/s
  optim.py        AdamW with weight-decay groups, the cosine schedule
  tokenizer.py    byte-level BPE
  data/           token shards: format, corpus reading, prepare, bundled corpus, batch loader
  train/          pretraining: config, run set-up, loop, metrics
  finetune.py     classification fine-tuning
  cli.py          the `gptkernels` command
"""
from gptkernels.gpt.classifier import GPTForSequenceClassification
from gptkernels.gpt.config import GPTConfig
from gptkernels.gpt.model import GPT

__all__ = ["GPT", "GPTConfig", "GPTForSequenceClassification"]
