"""The causal LM in Hugging Face conventions: save/load round trip through the Auto classes,
cached generation equals uncached, training lowers the loss, bad input is refused."""

import logging

import pytest
import torch
from conftest import assert_generates_alike
from transformers import AutoConfig, AutoModelForCausalLM

from mirasc.errors import SpecError
from mirasc.lm import CACHE_FIELD, MirasConfig, MirasForCausalLM

VOCAB = 40


def tiny(spec="specs/gated_deltanet.yaml", **overrides):
    settings = dict(spec=spec, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=2,
                    backend="torch") | overrides
    torch.manual_seed(0)
    return MirasForCausalLM(MirasConfig(**settings))


@pytest.mark.parametrize("spec,attention", [("specs/gated_deltanet.yaml", [1]),
                                            ("specs/memora.yaml", [])])
def test_save_and_load_round_trip(tmp_path, spec, attention):
    model = tiny(spec, attention_layers=attention).double().eval()
    ids = torch.randint(0, VOCAB, (2, 11))
    logits = model(ids).logits
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "mirasc"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert isinstance(loaded, MirasForCausalLM)
    assert loaded.config.spec == model.config.spec  # the spec's text travels with the weights
    assert torch.allclose(loaded(ids).logits, logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec,attention", [("specs/titans.yaml", [0]), ("specs/moneta.yaml", [])])
def test_generate_with_cache_equals_without(spec, attention):
    model = tiny(spec, attention_layers=attention, attention_window=3).double().eval()
    prompt = torch.randint(0, VOCAB, (2, 5))
    assert_generates_alike(model, prompt, 9)


def test_generation_logs_no_deprecation():
    """Generating through transformers' own cache plumbing warns of nothing mirasc passes."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    logging.Logger.warning_once.cache_clear()  # transformers logs each warning once per process
    hf_logger.addHandler(handler)
    try:
        model = tiny("specs/gated_deltanet.yaml").double().eval()
        model.generate(torch.randint(0, VOCAB, (1, 4)), max_new_tokens=3, do_sample=False)
    finally:
        hf_logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if "deprecated" in r.getMessage()]


def test_cached_logits_equal_the_parallel_forward():
    model = tiny("specs/yaad.yaml", attention_layers=[1], attention_window=4).double().eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    parallel = model(ids).logits
    out = model(ids[:, :7], use_cache=True)
    steps = [out.logits]
    for t in range(7, 12):
        out = model(ids[:, t:t + 1], cache=getattr(out, CACHE_FIELD), use_cache=True)
        steps.append(out.logits)
    assert getattr(out, CACHE_FIELD).get_seq_length() == 12
    assert torch.allclose(torch.cat(steps, 1), parallel, rtol=0, atol=1e-10)


def test_training_lowers_the_loss():
    """A few Adam steps on one repeated batch must fit it better."""
    model = tiny("specs/moneta.yaml")
    ids = torch.randint(0, VOCAB, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.7 * losses[0]


def test_a_spec_file_that_is_not_text_is_a_spec_error(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(SpecError, match=r"binary.yaml:1: not UTF-8 text \(byte 0x89 at offset 0\)"):
        MirasConfig(spec=str(path))


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="MirasConfig.spec is empty"):
        tiny(spec="")
    with pytest.raises(SpecError, match="retention.kind"):
        tiny(spec="name: x\nmemory: {kind: matrix}\nbias: {kind: l2}\nretention: {kind: l5}\n"
                  "learner: {kind: gd}\n")
    model = tiny()
    ids = torch.randint(0, VOCAB, (2, 6))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 40\)"):
        model(ids + VOCAB)
    with pytest.raises(ValueError, match="attention_mask has padding"):
        model(ids, attention_mask=torch.tensor([[1] * 6, [0, 0] + [1] * 4]))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(ids[0])
