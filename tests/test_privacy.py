"""DP-SGD with opacus on a tiny LoRA model: ε is reported, the loss falls, the noise is not
reproducible from the seed, and what opacus cannot account for is refused with a clear message."""

from __future__ import annotations

import math
import os
import sys
import types

import pytest
import torch
from pydantic import ValidationError

from conftest import SAMPLE_TEXTS, build_tiny_model
from lmsmith.errors import UserError
from lmsmith.train.config import LoraMethod
from lmsmith.train.data import Example
from lmsmith.train.method_config import DoraMethod, PrivacyConfig
from lmsmith.train.methods import apply_method
from lmsmith.train import privacy
from lmsmith.train.privacy import OS_SEEDED_RNG, collate_for_dp, make_private, per_example_mean_loss


@pytest.fixture(scope="module")
def examples(tiny_tokenizer) -> list[Example]:
    ids = tiny_tokenizer(SAMPLE_TEXTS[:5], add_special_tokens=False)["input_ids"]
    return [Example(input_ids=row, labels=list(row)) for row in ids] * 10  # 50 examples


def lora_setup(tiny_tokenizer, method=None):
    torch.manual_seed(0)
    model, _ = apply_method(build_tiny_model(tiny_tokenizer), method or LoraMethod(r=8, dropout=0.0, train_tokens="none"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    return model, optimizer


def full_loss(model, examples) -> float:
    batch = collate_for_dp([(torch.tensor(e.input_ids), torch.tensor(e.labels)) for e in examples[:5]], 3)
    with torch.no_grad():
        return float(per_example_mean_loss(model, batch))


def test_dp_sgd_reports_epsilon_and_learns(tiny_tokenizer, examples):
    model, optimizer = lora_setup(tiny_tokenizer)
    private = make_private(model, optimizer, examples, tiny_tokenizer.pad_token_id, batch_size=5, steps=10,
                           config=PrivacyConfig(noise_multiplier=0.5, max_grad_norm=1.0, delta=1e-3))
    assert private.epsilon() == 0.0
    before = full_loss(private.model, examples)
    private.model.train()
    for batch in private.batches():
        private.step(batch)
    after = full_loss(private.model, examples)
    report = private.report()
    assert report["dp_steps"] == 10 and report["dp_sample_rate"] == pytest.approx(0.1)
    assert 0 < report["dp_epsilon"] < math.inf
    assert after < before - 0.1


def test_target_epsilon_calibrates_the_noise(tiny_tokenizer, examples):
    model, optimizer = lora_setup(tiny_tokenizer)
    private = make_private(model, optimizer, examples, tiny_tokenizer.pad_token_id, batch_size=5, steps=4,
                           config=PrivacyConfig(target_epsilon=3.0, delta=1e-3))
    for batch in private.batches():
        private.step(batch)
    assert private.noise_multiplier > 0
    assert private.epsilon() == pytest.approx(3.0, rel=0.05)


def test_refuses_what_the_accountant_cannot_vouch_for(tiny_tokenizer, examples):
    with pytest.raises(ValidationError, match="delta is required"):
        PrivacyConfig(noise_multiplier=1.0)
    with pytest.raises(ValidationError, match="exactly one"):
        PrivacyConfig(noise_multiplier=1.0, target_epsilon=2.0, delta=1e-5)
    ok = PrivacyConfig(noise_multiplier=1.0, delta=1e-3)
    pad = tiny_tokenizer.pad_token_id
    model, optimizer = lora_setup(tiny_tokenizer)
    with pytest.raises(UserError, match=r"delta: 0.05 is not below 1 / 50"):
        make_private(model, optimizer, examples, pad, 5, 4, ok.model_copy(update={"delta": 0.05}))
    with pytest.raises(UserError, match="batch_size: 1; with Poisson sampling"):
        make_private(model, optimizer, examples, pad, 1, 4, ok)
    dora, dora_optimizer = lora_setup(tiny_tokenizer, DoraMethod(r=4, train_tokens="none"))
    with pytest.raises(UserError, match="method dora is not supported"):
        make_private(dora, dora_optimizer, examples, pad, 5, 4, ok, method_name="dora")
    # Trained embedding rows live in a peft wrapper opacus cannot hook: named in the refusal.
    rows, rows_optimizer = lora_setup(tiny_tokenizer, LoraMethod(r=4, train_tokens="all"))
    with pytest.raises(UserError, match="no per-example gradient for .*trainable_tokens_delta"):
        make_private(rows, rows_optimizer, examples, pad, 5, 4, ok, method_name="lora")


def test_an_empty_poisson_batch_still_adds_noise_and_counts(tiny_tokenizer, examples):
    model, optimizer = lora_setup(tiny_tokenizer)
    private = make_private(model, optimizer, examples, tiny_tokenizer.pad_token_id, batch_size=2, steps=2,
                           config=PrivacyConfig(noise_multiplier=1.0, delta=1e-3))
    first = next(iter(private.batches()))
    private.step(first)
    trainable = [p for p in private.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    epsilon = private.epsilon()
    assert private.step({name: tensor[:0] for name, tensor in first.items()}) is None
    assert private.steps_done == 2 and private.epsilon() > epsilon
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable))


def train_once(tiny_tokenizer, examples, config: PrivacyConfig) -> tuple[list[torch.Tensor], dict]:
    model, optimizer = lora_setup(tiny_tokenizer)  # same global seed, so the same LoRA init every time
    private = make_private(model, optimizer, examples, tiny_tokenizer.pad_token_id, batch_size=5, steps=3,
                           config=config)
    for batch in private.batches():
        private.step(batch)
    return [p.detach().clone() for p in private.model.parameters() if p.requires_grad], private.report()


def test_the_seed_does_not_reproduce_noise_or_sampling(tiny_tokenizer, examples, monkeypatch):
    monkeypatch.setattr(privacy, "_csprng_importable", lambda: False)
    config = PrivacyConfig(noise_multiplier=1.0, delta=1e-3)
    first, report = train_once(tiny_tokenizer, examples, config)
    second, again = train_once(tiny_tokenizer, examples, config)
    assert any(not torch.equal(a, b) for a, b in zip(first, second))
    # ε depends only on noise multiplier, sample rate and steps, so it is what reruns reproduce.
    assert report["dp_epsilon"] == again["dp_epsilon"] > 0
    assert report["dp_noise_rng"] == OS_SEEDED_RNG and report["dp_noise_secure"] is False
    assert "sft_train" in report["dp_scope"]


def test_the_sampler_and_noise_generators_are_fresh_every_step(tiny_tokenizer, examples, monkeypatch):
    monkeypatch.setattr(privacy, "_csprng_importable", lambda: False)
    model, optimizer = lora_setup(tiny_tokenizer)
    private = make_private(model, optimizer, examples, tiny_tokenizer.pad_token_id, batch_size=5, steps=3,
                           config=PrivacyConfig(noise_multiplier=1.0, delta=1e-3))
    # torch keeps 32 bits of a seed: one seed per run would be a searchable space, so each step gets its own.
    seeds = set()
    for batch in private.batches():
        seeds.add(private.sampler_generator.initial_seed())
        private.step(batch)
        seeds.add(private.noise_generator.initial_seed())
    assert len(seeds) == 6
    # The global torch generator (seeded by the stage from the recipe) plays no part in sampling.
    assert private.data_loader.batch_sampler.generator is private.sampler_generator
    assert private.optimizer.generator is private.noise_generator and private.optimizer.secure_mode


def test_secure_rng_required_refuses_without_torchcsprng(tiny_tokenizer, examples, monkeypatch):
    monkeypatch.setattr(privacy, "_csprng_importable", lambda: False)
    model, optimizer = lora_setup(tiny_tokenizer)
    config = PrivacyConfig(noise_multiplier=1.0, delta=1e-3, secure_rng="required")
    with pytest.raises(UserError, match=r"^privacy\.secure_rng: required, but torchcsprng is not importable") as error:
        make_private(model, optimizer, examples, tiny_tokenizer.pad_token_id, 5, 3, config)
    assert "\n" not in str(error.value)
    with pytest.raises(ValidationError, match="secure_rng"):
        PrivacyConfig(noise_multiplier=1.0, delta=1e-3, secure_rng="yes")


def test_torchcsprng_turns_on_opacus_secure_mode(tiny_tokenizer, examples, monkeypatch):
    """torchcsprng has no build for this torch, so a stand-in module with its one function opacus calls
    checks the wiring: secure mode on, and opacus' generator used for both noise and sampling."""
    created = []

    def create_random_device_generator(path):
        created.append(torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little")))
        return created[-1]

    monkeypatch.setitem(sys.modules, "torchcsprng", types.SimpleNamespace(
        create_random_device_generator=create_random_device_generator))
    model, optimizer = lora_setup(tiny_tokenizer)
    private = make_private(model, optimizer, examples, tiny_tokenizer.pad_token_id, batch_size=5, steps=2,
                           config=PrivacyConfig(noise_multiplier=1.0, delta=1e-3, secure_rng="required"))
    for batch in private.batches():
        private.step(batch)
    assert private.engine.secure_mode and len(created) == 1
    assert private.optimizer.generator is created[0] and private.data_loader.batch_sampler.generator is created[0]
    assert private.noise_generator is None and private.sampler_generator is None
    report = private.report()
    assert report["dp_noise_rng"] == "torchcsprng" and report["dp_noise_secure"] is True


def test_an_empty_first_poisson_batch_is_an_empty_dict(tiny_tokenizer, examples):
    # opacus gives a list, not the collated structure, when nobody is sampled before any batch was built.
    model, optimizer = lora_setup(tiny_tokenizer)
    private = make_private(model, optimizer, examples, tiny_tokenizer.pad_token_id, batch_size=2, steps=2,
                           config=PrivacyConfig(noise_multiplier=1.0, delta=1e-3))
    private.data_loader.batch_sampler.sample_rate = 0.0  # nobody joins any batch
    for batch in private.batches():
        assert set(batch) == {"input_ids", "labels", "attention_mask"} and batch["input_ids"].shape[0] == 0
        assert private.step(batch) is None and int(batch["attention_mask"].sum()) == 0
    assert private.steps_done == 2 and private.epsilon() > 0
