"""GPTForSequenceClassification on CPU: pooling of the last real token, padding invariance,
learning a toy task whose label only attention can carry to the last token, loading a body."""
import pytest
import torch

from gptkernels import GPT, GPTConfig, GPTForSequenceClassification

PAD = 0


def config(**kw):
    d = dict(vocab_size=64, block_size=24, n_layer=2, n_head=4, n_embd=32)
    d.update(kw)
    return GPTConfig(**d)


def toy_batch(n, g):
    """Label = whether the FIRST token is in 1..10 (class 0) or 11..20 (class 1); the rest are
    random tokens from 21..63 and the lengths vary (right-padded with PAD). The classifier reads
    the last real token, so attention has to carry the first token's identity there."""
    labels = torch.randint(0, 2, (n,), generator=g)
    lens = torch.randint(4, 17, (n,), generator=g)
    idx = torch.full((n, 16), PAD, dtype=torch.long)
    for b in range(n):
        idx[b, 0] = torch.randint(1, 11, (1,), generator=g) + 10 * labels[b]
        idx[b, 1:lens[b]] = torch.randint(21, 64, (int(lens[b]) - 1,), generator=g)
    return idx, lens, labels


def test_learns_a_toy_task():
    torch.manual_seed(0)
    model = GPTForSequenceClassification(config(), num_classes=2, pad_token_id=PAD)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(60):
        idx, _, labels = toy_batch(32, g)
        _, loss = model(idx, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    idx, lens, labels = toy_batch(256, torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, loss = model(idx, labels)
    acc = (logits.argmax(-1) == labels).float().mean().item()
    assert acc > 0.95 and loss.item() < 0.2, (acc, loss.item())


def test_pooling_reads_the_last_real_token_and_ignores_padding():
    torch.manual_seed(0)
    model = GPTForSequenceClassification(config(), num_classes=3, pad_token_id=PAD).eval()
    idx, lens, _ = toy_batch(5, torch.Generator().manual_seed(2))
    mask = (torch.arange(16) < lens[:, None]).long()
    with torch.no_grad():
        by_pad, _ = model(idx)
        by_mask, _ = model(idx, attention_mask=mask)
        by_len, _ = model(idx, lengths=lens)
        alone = torch.cat([model(idx[b:b + 1, :lens[b]])[0] for b in range(5)])
        # the classifier applied by hand to the GPT's hidden state at lengths - 1
        h = model.gpt.hidden_states(idx)
        manual = model.score(h[torch.arange(5), lens - 1])
    torch.testing.assert_close(by_pad, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_mask, by_pad, atol=0, rtol=0)
    torch.testing.assert_close(by_len, by_pad, atol=0, rtol=0)
    torch.testing.assert_close(by_pad, manual, atol=1e-6, rtol=1e-6)
    # without any padding information the last position is pooled
    no_pad = GPTForSequenceClassification(config(), 3)
    no_pad.load_state_dict(model.state_dict())
    assert torch.equal(no_pad.pooled_positions(idx), torch.full((5,), 15))
    # a pad token inside the text is just a token: the LAST non-pad one is pooled
    assert model.pooled_positions(torch.tensor([[5, PAD, 7, PAD, PAD]])).tolist() == [2]


def test_loading_a_pretrained_body():
    torch.manual_seed(0)
    gpt = GPT(config(tie_embeddings=False))
    clf = GPTForSequenceClassification.from_gpt(gpt, 2)
    assert clf.gpt is gpt
    # our checkpoint format, as saved from a compiled model (prefix "_orig_mod.")
    sd = {"_orig_mod." + k: v.clone() for k, v in gpt.state_dict().items()}
    fresh = GPTForSequenceClassification(config(tie_embeddings=False), 2)
    fresh.load_gpt_state_dict(sd)
    idx = torch.randint(1, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(fresh.gpt.hidden_states(idx), gpt.hidden_states(idx), atol=0, rtol=0)
    # a tied checkpoint saved without the (duplicate) LM head
    tied = GPT(config())
    sd = {k: v for k, v in tied.state_dict().items() if k != "lm_head.weight"}
    clf = GPTForSequenceClassification(config(), 2)
    clf.load_gpt_state_dict(sd)
    assert torch.equal(clf.gpt.lm_head.weight, tied.transformer.wte.weight)
    with pytest.raises(ValueError, match="config differs"):
        GPTForSequenceClassification(config(n_layer=3), 2, body=gpt)


def test_from_hugging_face_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=24, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    clf = GPTForSequenceClassification.from_pretrained(tmp_path, num_classes=4, pad_token_id=0)
    assert clf.training and clf.num_classes == 4
    idx = torch.randint(1, 64, (2, 12))
    with torch.no_grad():
        h = clf.eval().gpt.hidden_states(idx)
        expected = hf.transformer(idx).last_hidden_state
    assert (h - expected).abs().max().item() < 1e-4


def test_bad_arguments():
    model = GPTForSequenceClassification(config(), 2, pad_token_id=PAD)
    idx = torch.randint(1, 64, (2, 6))
    with pytest.raises(ValueError, match="num_classes"):
        GPTForSequenceClassification(config(), 1)
    with pytest.raises(ValueError, match="pad_token_id"):
        GPTForSequenceClassification(config(), 2, pad_token_id=64)
    with pytest.raises(ValueError, match="right padding"):
        model(idx, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="at least one 1"):
        model(idx, attention_mask=torch.tensor([[0] * 6, [1] * 6]))
    with pytest.raises(ValueError, match="lengths"):
        model(idx, lengths=[3, 7])
    with pytest.raises(ValueError, match="only of pad_token_id"):
        model(torch.tensor([[PAD, PAD], [1, 2]]))
    with pytest.raises(ValueError, match="target"):
        model(idx, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[1, 99]]))
