"""A checkpoint written by an earlier release (tests/data/ckpt_v1: `gptkernels train` at commit
c96fc0d, before the application moved into gptkernels/gpt/ and the blocks took their own
LayerNorms) still loads and generates the same greedy tokens."""
import json
import os

import torch

from gptkernels.gpt.checkpoint import load_model
from gptkernels.gpt.cli import main as cli_main

HERE = os.path.dirname(os.path.abspath(__file__))
CKPT = os.path.join(HERE, "data", "ckpt_v1")


def _expected():
    with open(os.path.join(CKPT, "expected.json")) as f:
        return json.load(f)


def test_old_checkpoint_generates_the_same_tokens():
    exp = _expected()
    model, tok, kind = load_model(CKPT)
    assert kind == "ckpt"
    ids = [tok.eos_id] + tok.encode(exp["prompt"])
    assert ids == exp["prompt_ids"]
    out = model.generate(torch.tensor([ids]), exp["max_new_tokens"], temperature=0)[0].tolist()
    assert out[len(ids):] == exp["greedy_ids"]
    # The loss on prompt + continuation, to fp32 accuracy (a greedy match alone tolerates small drifts).
    seq = torch.tensor([out])
    with torch.no_grad():
        _, loss = model(seq[:, :-1], seq[:, 1:])
    torch.testing.assert_close(float(loss), exp["loss_on_sequence"], rtol=1e-5, atol=1e-5)


def test_old_checkpoint_through_the_cli(capsys):
    exp = _expected()
    rc = cli_main(["generate", CKPT, "--prompt", exp["prompt"], "--temperature", "0", "--max-new-tokens",
                   str(exp["max_new_tokens"]), "--device", "cpu", "--no-stop-at-eos"])
    assert rc == 0
    assert capsys.readouterr().out == exp["prompt"] + exp["greedy_text"] + "\n"
