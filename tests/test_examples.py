"""The examples: the MQAR data generator, a tiny MQAR training run, and the custom objective's
spec compiling to generated kernels."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch

import mirasc

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def example(monkeypatch):
    """Import a script from examples/ by module name."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module


def test_mqar_batch_answers_the_queried_keys(example):
    mqar = example("mqar")
    task = mqar.Task(pairs=6, queries=4, num_keys=10, num_values=7)
    input_ids, labels = mqar.mqar_batch(task, 50, torch.Generator().manual_seed(3))
    assert input_ids.shape == labels.shape == (50, task.length) == (50, 20)
    assert input_ids.min() >= 0 and input_ids.max() < task.vocab_size
    keys, values = input_ids[:, :12:2], input_ids[:, 1:12:2]
    assert (keys < 10).all() and (values >= 10).all()
    assert all(len(set(row.tolist())) == 6 for row in keys)
    scored = labels != mqar.IGNORE
    assert scored.sum(1).eq(4).all()
    assert scored[:, 13::2].all() and not scored[:, :13].any() and not scored[:, 12::2].any()
    for b in range(50):
        pairs = dict(zip(keys[b].tolist(), values[b].tolist(), strict=True))
        asked, answers = input_ids[b, 12::2].tolist(), labels[b, 13::2].tolist()
        assert len(set(asked)) == 4
        assert answers == [pairs[k] for k in asked]
    again, _ = mqar.mqar_batch(task, 50, torch.Generator().manual_seed(3))
    assert torch.equal(again, input_ids)


def test_mqar_accuracy_scores_only_the_answers(example):
    mqar = example("mqar")
    labels = torch.tensor([[-100, -100, 5, -100, 6]])
    logits = torch.zeros(1, 5, 8)
    logits[0, 1, 5] = logits[0, 3, 2] = logits[0, 0, 7] = 1.0  # right, wrong, unscored
    assert mqar.answer_accuracy(logits, labels) == 0.5


@pytest.fixture
def one_thread():
    """Run on one intra-op thread (small tensors: faster, and no oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mqar_tiny_model_learns(example, one_thread):
    mqar = example("mqar")
    task = mqar.Task(pairs=2, queries=2, num_keys=4, num_values=4)
    model = mqar.build_model(mqar.spec_path("linear_attention"), task, hidden_size=16, layers=1,
                             heads=1, backend="torch")
    losses = mqar.train(model, [task], steps=30, batch_size=16, lr=1e-2)
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert mqar.evaluate(model, task, sequences=64, seed=1) > 1 / task.num_values


def test_mqar_atlas_set_builds_and_trains(example, one_thread):
    """`--atlas`: each spec takes a training step on a tiny model that moves every parameter;
    the Omega rule's gamma (the window weight's gate) gets a gradient; atlas_muon runs on the
    reference."""
    mqar = example("mqar")
    assert mqar.parse_args(["--atlas"]).specs == list(mqar.ATLAS_SPECS)
    task = mqar.Task(pairs=2, queries=2, num_keys=4, num_values=4)
    for name in mqar.ATLAS_SPECS:
        model = mqar.build_model(mqar.spec_path(name), task, hidden_size=16, layers=1, heads=1)
        layer = model.model.layers[0].mixer
        assert layer.op.backend == ("reference" if name.endswith("atlas_muon.yaml") else "triton")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses = mqar.train(model, [task], steps=1, batch_size=4, lr=1e-2)
        assert math.isfinite(losses[0]), name
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert moved == set(before), (name, set(before) - moved)
        windowed = name not in ("gated_deltanet", "titans")
        assert ("window_weight" in layer.gates) == windowed, name
        if windowed:
            assert layer.gates["window_weight"].up.weight.grad.abs().sum() > 0, name


def test_custom_objective_compiles_to_kernels(example, monkeypatch, tmp_path):
    monkeypatch.setenv("MIRASC_CACHE_DIR", str(tmp_path))  # generate, not load a cached module
    op = mirasc.compile(example("custom_objective").SPEC)
    assert list(tmp_path.glob("cauchy_elastic-*.py"))
    assert op.backend == "triton"
    assert op.spec.bias.kind == "expression" and op.spec.retention.kind == "elastic_net"
