"""GPT.from_pretrained against Hugging Face transformers' GPT2LMHeadModel: randomly initialised
small models (no download) saved with save_pretrained, loaded by us; logits and greedy
continuations must match. Plus malformed and untrusted checkpoints."""
import json
import os

import pytest
import torch

from gptkernels import GPT

transformers = pytest.importorskip("transformers")

V = 97


def hf_model(activation="gelu_new", tie=True, n_kv=None, **kw):
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=48, n_embd=48, n_layer=2, n_head=4,
                                  activation_function=activation, tie_word_embeddings=tie,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random (non-default) LayerNorms and biases, larger weights: a sharper test
        for name, p in m.named_parameters():
            if "ln_" in name or name.endswith(".bias"):
                p.add_(0.2 * torch.randn_like(p))
            elif name.startswith("transformer.h."):
                p.mul_(3.0)
            else:  # embeddings (and an untied head): logits of order 1, not 0.02
                p.mul_(20.0)
    return m


def save(m, path, fmt="safetensors"):
    m.save_pretrained(path)
    if fmt == "bin":  # the older format: a pickled state_dict
        os.remove(os.path.join(path, "model.safetensors"))
        torch.save(m.state_dict(), os.path.join(path, "pytorch_model.bin"))
    return path


@pytest.mark.parametrize("activation, tie, fmt", [
    ("gelu_new", True, "safetensors"),
    ("gelu_new", True, "bin"),
    ("relu", False, "safetensors"),
    ("gelu", True, "safetensors"),
])
def test_logits_match_hugging_face(tmp_path, activation, tie, fmt):
    hf = hf_model(activation, tie)
    ours = GPT.from_pretrained(save(hf, tmp_path, fmt))
    assert not ours.training
    c = ours.config
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd, c.tie_embeddings) == (V, 48, 2, 4, 48, tie)
    assert c.activation == {"gelu_new": "gelu_tanh", "relu": "relu", "gelu": "gelu"}[activation]
    idx = torch.randint(0, V, (3, 40))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    assert expected.std() > 1.0  # logits of a size where 1e-4 is a sharp test
    assert (logits - expected).abs().max().item() < 1e-4
    # the loss agrees with HF's (labels shifted inside HF)
    with torch.no_grad():
        hf_loss = hf(idx, labels=idx).loss
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - hf_loss.item()) < 1e-5


@pytest.mark.parametrize("tie", [True, False])
def test_greedy_continuation_matches_hugging_face(tmp_path, tie):
    hf = hf_model(tie=tie)
    ours = GPT.from_pretrained(save(hf, tmp_path))
    idx = torch.randint(1, V, (2, 9))
    with torch.no_grad():
        expected = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False,
                               pad_token_id=0)
    out = ours.generate(idx, 20, temperature=0)
    assert expected.shape == out.shape == (2, 29)
    assert torch.equal(out, expected)
    if not tie:  # (random tied models soon repeat one token; the untied one gives a varied continuation)
        assert min(len(set(row)) for row in out[:, 9:].tolist()) >= 4


def test_sharded_safetensors_and_prefixless_keys(tmp_path):
    """A checkpoint split over shards with an index, and keys without the "transformer." prefix
    (as GPT2Model saves them), load to the same model."""
    from safetensors.torch import save_file

    hf = hf_model()
    save(hf, tmp_path)
    os.remove(tmp_path / "model.safetensors")
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    names = sorted(sd)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(tmp_path / fname))
        weight_map.update({k: fname for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ours = GPT.from_pretrained(tmp_path)
    idx = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4


# ---- malformed, missing and untrusted checkpoints -------------------------------------------------
def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        GPT.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path)
    save(hf_model(), tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights found.*model.safetensors.*pytorch_model.bin"):
        GPT.from_pretrained(tmp_path)


def test_malformed_config(tmp_path):
    save(hf_model(), tmp_path)
    cfg = tmp_path / "config.json"
    good = json.loads(cfg.read_text())
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        GPT.from_pretrained(tmp_path)
    for change, match in [({"model_type": "llama"}, "model_type 'llama'"),
                          ({"activation_function": "swish"}, "activation_function 'swish'"),
                          ({"n_inner": 100}, "n_inner"),
                          ({"n_head": 5}, "n_embd"),
                          ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx")]:
        cfg.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=match):
            GPT.from_pretrained(tmp_path)
    del good["n_layer"]
    cfg.write_text(json.dumps(good))
    with pytest.raises(ValueError, match=r"missing GPT-2 config fields \['n_layer'\]"):
        GPT.from_pretrained(tmp_path)


def test_weights_that_do_not_match_the_config(tmp_path):
    save(hf_model(), tmp_path)
    cfg = tmp_path / "config.json"
    good = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**good, "n_embd": 64}))
    with pytest.raises(ValueError, match="model.safetensors: .*has shape"):
        GPT.from_pretrained(tmp_path)
    cfg.write_text(json.dumps({**good, "n_layer": 3}))
    with pytest.raises(ValueError, match=r"model.safetensors: does not match.*missing \['transformer.h.2"):
        GPT.from_pretrained(tmp_path)


def test_corrupt_safetensors(tmp_path):
    save(hf_model(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        GPT.from_pretrained(tmp_path)


class Boom:
    """Unpickling this object calls open(path, "w"): a side effect that shows whether it ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    """pytorch_model.bin is read with weights_only=True: a pickle that would call a function is
    refused with an error naming the file, never executed."""
    save(hf_model(), tmp_path, "bin")
    marker = tmp_path / "ran"
    evil = {"x": torch.zeros(1), "y": Boom(marker)}
    torch.save(evil, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin: not a readable weights-only PyTorch checkpoint"):
        GPT.from_pretrained(tmp_path)
    assert not marker.exists()
