"""A patched Hugging Face model in the HF workflow: save_pretrained -> from_pretrained round trip
(byte-identical files, same tensors), and one HF Trainer step equal to the unpatched model's (SGD with weight
decay, so the Trainer's no-decay grouping of LayerNorm weights is exercised too)."""
import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import transformers  # noqa: E402

import gptkernels.hf  # noqa: E402
import hf_models as M  # noqa: E402


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_save_pretrained_round_trip(tmp_path, model_type):
    ref = M.make(model_type)
    patched = gptkernels.hf.patch(copy.deepcopy(ref))
    ref.save_pretrained(tmp_path / "ref")
    patched.save_pretrained(tmp_path / "patched")
    for f in ("model.safetensors", "config.json", "generation_config.json"):  # no "gptkernels" leaks out
        assert (tmp_path / "patched" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "patched")
    assert type(loaded) is type(ref)
    for (n, p), q in zip(ref.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), n
    gptkernels.hf.patch(loaded)
    x = torch.randint(3, M.V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).logits, patched.eval()(x).logits, rtol=0, atol=0)


def _train_one_step(model, out_dir, data):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=0.5, weight_decay=0.1,
        optim="sgd", lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", dataloader_num_workers=0, seed=0, data_seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    return result.training_loss


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_one_trainer_step_matches(tmp_path, model_type):
    ref = M.make(model_type)
    patched = gptkernels.hf.patch(copy.deepcopy(ref))
    truth = copy.deepcopy(ref).double()
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    g = torch.Generator().manual_seed(3)
    data = []
    for i in range(4):
        ids = torch.randint(3, M.V, (12,), generator=g)
        labels = ids.clone()
        labels[: 3 * i + 1] = -100  # rows with different numbers of labels: num_items_in_batch matters
        data.append({"input_ids": ids, "labels": labels})
    losses = [_train_one_step(m, tmp_path / name, data) for m, name in ((ref, "ref"), (patched, "patched"),
                                                                         (truth, "truth"))]
    M.check("trainer loss", torch.tensor(losses[1]), torch.tensor(losses[0]), torch.tensor(losses[2]))
    assert patched.gptkernels_patched.cross_entropy
    for (n, p), q, t in zip(ref.named_parameters(), patched.parameters(), truth.parameters()):
        # compare the updates (new - old): the parameters themselves differ by far less than one ulp of theirs
        M.check(f"{model_type} update {n}", q.detach() - before[n], p.detach() - before[n], t.detach() - before[n])
