"""DP-SGD on the trainable parameters, with opacus doing the per-example gradients, noise and accounting.

`make_private` wraps a model (usually LoRA: few trainable parameters means little noise to add), its
optimiser and the training examples: batches are drawn by Poisson sampling (each example joins each
step with probability q = batch_size / N, which the accountant's guarantee assumes), every example's
gradient is clipped to `max_grad_norm`, and Gaussian noise of std `noise_multiplier · max_grad_norm`
is added before each step. ε at the configured δ is reported by the RDP (or PRV) accountant.

Configurations the accountant's guarantee would not cover are refused with a `UserError` before any
step runs: a missing or too large δ, an expected batch below 2 examples, a method whose trainable
parameters opacus gets no per-example gradient for. Under DP the loop must not clip the summed
gradient itself (opacus clips per example) and must draw batches from `PrivateTraining.batches()`.

Randomness. ε assumes the attacker cannot predict the noise or which examples each batch holds, so
neither is ever derived from the recipe seed (a rerun of the same recipe gives different weights):
- with `torchcsprng` importable, opacus' secure mode draws both from /dev/urandom through a CSPRNG and
  sums four Gaussians per noise value against floating-point attacks (arXiv:2107.10138);
- without it (the default `secure_rng: auto`; `required` refuses to start), the noise and the Poisson
  sampler use torch's Mersenne Twister seeded from `secrets` (the OS entropy source). torch keeps only
  32 bits of a seed, so both generators get a fresh seed before every step, and the optimiser uses
  opacus' four-Gaussian noise too; still not a cryptographic generator, which a warning and the
  report (`dp_noise_rng`, `dp_noise_secure`) say.
What stays seeded is outside the mechanism: the LoRA (or other adapter) initialisation and dropout
masks come from the global torch seed and are independent of the data, as the DP-SGD analysis allows.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from lmsmith.console import console
from lmsmith.errors import UserError
from lmsmith.train.data import IGNORE_INDEX, Example
from lmsmith.train.method_config import PrivacyConfig

MIN_EXPECTED_BATCH = 2

SECURE_RNG = "torchcsprng"
OS_SEEDED_RNG = "os-seeded torch generator (not cryptographically secure)"
DP_SCOPE = (
    "the sft_train examples, as far as the trained weights reveal them; not the corpus, sft_val/sft_test, "
    "the logged training loss, nor the data stage's files in the run folder"
)

# Methods whose peft forward opacus' per-example hooks cannot follow (checked on peft 0.21, opacus 1.6).
UNSUPPORTED_METHODS = {
    "dora": "DoRA's magnitude layer is called with adapter arguments that opacus' hooks do not pass on",
    "prefix": "prefix tuning reshapes its key/value cache by batch size and fails on the empty batches "
    "Poisson sampling produces",
}


class _ExampleTensors(torch.utils.data.Dataset):
    """Examples as (input_ids, labels) tensor pairs: opacus reads the shapes of item 0."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        example = self.examples[index]
        return torch.tensor(example.input_ids), torch.tensor(example.labels)


def collate_for_dp(rows: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (input_ids, labels) pairs as a dict of tensors; no rows give an empty batch.

    opacus never calls this for an empty Poisson sample: it copies the structure of the last batch it
    collated, and only before the first one returns a list instead (`PrivateTraining.batches` turns
    that into the empty dict from here), so the mask is always present."""
    width = max((len(ids) for ids, _ in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(rows):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = targets
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def per_example_mean_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the batch of each sequence's mean token cross-entropy.

    opacus (loss_reduction="mean") multiplies per-example gradients by the batch size to undo the batch
    mean, so each example's clipped gradient is that of its own token-mean loss, whatever its length.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -batch["input_ids"].shape[1] :][:, :-1].float()  # drop prompt tuning's virtual tokens
    targets = batch["labels"][:, 1:]
    token_losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return (token_losses.sum(dim=1) / counts).mean()


def _backward(loss: torch.Tensor) -> None:
    with warnings.catch_warnings():
        # With a frozen embedding no layer input needs a gradient; opacus' hooks work regardless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing.*")
        loss.backward()


@dataclass
class PrivateTraining:
    """The opacus-wrapped model, optimiser and Poisson data loader of one DP-SGD run."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: torch.utils.data.DataLoader
    engine: object
    config: PrivacyConfig
    noise_multiplier: float
    sample_rate: float
    steps: int
    noise_rng: str  # SECURE_RNG or OS_SEEDED_RNG
    # The OS-seeded generators, reseeded every step; None when opacus' torchcsprng generator is in use.
    noise_generator: torch.Generator | None = None
    sampler_generator: torch.Generator | None = None
    steps_done: int = 0
    losses: list[float] = field(default_factory=list)

    @property
    def trained_model(self) -> torch.nn.Module:
        """The model under opacus' wrapper: what validation and saving see."""
        return getattr(self.model, "_module", self.model)

    def epsilon(self) -> float:
        """ε spent so far at the configured δ."""
        if self.steps_done == 0:
            return 0.0
        return float(self.engine.get_epsilon(self.config.delta))

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """`steps` Poisson-sampled batches (some may be empty: they still count and still get noise)."""
        produced = 0
        while produced < self.steps:
            # opacus' sampler draws each batch's membership lazily, when the loader is asked for it.
            _reseed(self.sampler_generator)
            for batch in self.data_loader:
                if not isinstance(batch, dict):  # opacus' stand-in for an empty sample before any batch
                    batch = collate_for_dp([], pad_id=0)
                yield batch
                produced += 1
                if produced == self.steps:
                    return
                _reseed(self.sampler_generator)

    def step(self, batch: dict[str, torch.Tensor]) -> float | None:
        """One DP-SGD step on `batch`: per-example clipped gradients, noise, update. Returns the batch's
        loss (None for an empty batch)."""
        loss_value = None
        if batch["input_ids"].shape[0] > 0:
            loss = per_example_mean_loss(self.model, batch)
            _backward(loss)
            loss_value = float(loss.detach())
            self.losses.append(loss_value)
        else:
            # Nobody was sampled: opacus still adds noise to zero gradients, and the step still counts.
            for param in self.model.parameters():
                if param.requires_grad:
                    param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
        _reseed(self.noise_generator)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return loss_value

    def report(self) -> dict:
        return {
            "dp_epsilon": round(self.epsilon(), 4),
            "dp_delta": self.config.delta,
            "dp_noise_multiplier": round(self.noise_multiplier, 4),
            "dp_max_grad_norm": self.config.max_grad_norm,
            "dp_sample_rate": round(self.sample_rate, 6),
            "dp_steps": self.steps_done,
            "dp_noise_rng": self.noise_rng,
            "dp_noise_secure": self.noise_rng == SECURE_RNG,
            "dp_scope": DP_SCOPE,
        }


def _reseed(generator: torch.Generator | None) -> None:
    if generator is not None:
        generator.manual_seed(secrets.randbits(64))


def _csprng_importable() -> bool:
    try:
        import torchcsprng  # noqa: F401
    except (ImportError, OSError):  # OSError: a build for another torch fails to load its library
        return False
    return True


def _check_noise_source(config: PrivacyConfig) -> bool:
    """Whether opacus' secure mode (torchcsprng) is available; refuses `secure_rng: required` without it."""
    if _csprng_importable():
        return True
    if config.secure_rng == "required":
        raise UserError(
            f"privacy.secure_rng: required, but torchcsprng is not importable; install torchcsprng built for "
            f"torch {torch.__version__.split('+')[0]} (github.com/pytorch/csprng), or set secure_rng: auto to "
            "accept OS-seeded torch generators"
        )
    return False


def check_config(config: PrivacyConfig, examples: int, batch_size: int, method_name: str | None) -> float:
    """The sample rate q, after refusing what the accountant cannot vouch for."""
    if config.delta is None:
        raise UserError("privacy.delta: required; ε is only meaningful at a given δ")
    if examples < 2:
        raise UserError(f"privacy: {examples} training example(s); DP-SGD needs a data set to sample from")
    if config.delta >= 1 / examples:
        raise UserError(
            f"privacy.delta: {config.delta:g} is not below 1 / {examples} examples; at that δ releasing a "
            "whole example still meets the guarantee (use e.g. 1 / (10 · N))"
        )
    if batch_size < MIN_EXPECTED_BATCH:
        raise UserError(
            f"batch_size: {batch_size}; with Poisson sampling an expected batch of 1 leaves about "
            f"{100 * math.exp(-1):.0f}% of steps empty and the rest single examples, so use at least "
            f"{MIN_EXPECTED_BATCH}"
        )
    if batch_size > examples:
        raise UserError(f"batch_size: {batch_size} exceeds the {examples} training examples")
    if method_name in UNSUPPORTED_METHODS:
        raise UserError(f"privacy: method {method_name} is not supported: {UNSUPPORTED_METHODS[method_name]}")
    return batch_size / examples


def _check_per_example_gradients(model, probe: dict[str, torch.Tensor]) -> None:
    """Run one forward/backward (no update) and refuse if any trainable parameter got no per-example
    gradient: opacus would stop at the first step, or worse, the guarantee would not cover it."""
    try:
        _backward(per_example_mean_loss(model, probe))
    except (TypeError, RuntimeError) as exc:
        raise UserError(f"privacy: opacus cannot compute per-example gradients for this model: {exc}") from None
    missing = [
        name.removeprefix("_module.")
        for name, param in model.named_parameters()
        if param.requires_grad and getattr(param, "grad_sample", None) is None
    ]
    for param in model.parameters():
        param.grad = None
        if hasattr(param, "grad_sample"):
            param.grad_sample = None
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(
            f"privacy: opacus computes no per-example gradient for {shown} (their modules use the parameter "
            "outside a layer opacus can hook); freeze them, e.g. LoRA with train_tokens: none"
        )


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    examples: Sequence[Example],
    pad_id: int,
    batch_size: int,
    steps: int,
    config: PrivacyConfig,
    method_name: str | None = None,
) -> PrivateTraining:
    """Wrap model, optimiser and data for DP-SGD over `steps` steps of expected size `batch_size`.

    With `target_epsilon`, the noise multiplier is calibrated so that all `steps` together spend it.
    There is no seed argument on purpose: noise and sampling come from torchcsprng or from OS entropy
    (see the module docstring), so two runs never share them.
    """
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier
    from opacus.validators import ModuleValidator

    secure = _check_noise_source(config)
    sample_rate = check_config(config, len(examples), batch_size, method_name)
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise UserError(f"privacy: opacus refuses this model: {'; '.join(str(p) for p in problems[:3])}")
    if config.noise_multiplier is not None:
        noise = config.noise_multiplier
    else:
        try:
            noise = get_noise_multiplier(
                target_epsilon=config.target_epsilon,
                target_delta=config.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=config.accountant,
            )
        except ValueError as exc:
            raise UserError(f"privacy.target_epsilon: {config.target_epsilon} is not reachable: {exc}") from None

    noise_generator = sampler_generator = None
    if not secure:
        device = next(param.device for param in model.parameters() if param.requires_grad)
        noise_generator = torch.Generator(device=device)
        # The Poisson sampler draws its mask with torch.rand on the CPU.
        sampler_generator = torch.Generator()
        _reseed(noise_generator)
        _reseed(sampler_generator)
        console.print(
            "[yellow]warning[/] DP-SGD noise is not cryptographically secure: torchcsprng is not importable, "
            "so noise and sampling use torch generators seeded from the OS (never from the recipe seed); "
            "set privacy.secure_rng: required to refuse this"
        )
    loader = torch.utils.data.DataLoader(
        _ExampleTensors(examples),
        batch_size=batch_size,
        collate_fn=lambda rows: collate_for_dp(rows, pad_id),
        # opacus' Poisson sampler inherits this generator; without one it would draw from the global
        # torch generator, which the stage seeds from the recipe.
        generator=sampler_generator,
    )
    with warnings.catch_warnings():
        # opacus' own "secure RNG turned off" advice is replaced by the warning above.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        engine = PrivacyEngine(accountant=config.accountant, secure_mode=secure)
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise,
            max_grad_norm=config.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise_generator,
        )
    # opacus ties its floating-point-attack-resistant noise (four Gaussians per value) to secure mode;
    # it depends only on the generator it is given, so the OS-seeded path uses it too.
    private_optimizer.secure_mode = True
    probe = collate_for_dp([loader.dataset[0], loader.dataset[1]], pad_id)
    _check_per_example_gradients(private_model, probe)
    return PrivateTraining(
        model=private_model,
        optimizer=private_optimizer,
        data_loader=private_loader,
        engine=engine,
        config=config,
        noise_multiplier=noise,
        sample_rate=sample_rate,
        steps=steps,
        noise_rng=SECURE_RNG if secure else OS_SEEDED_RNG,
        noise_generator=noise_generator,
        sampler_generator=sampler_generator,
    )
