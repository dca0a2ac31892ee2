"""Many LoRA adapters over one base model, applied per row inside a shared forward pass (torch).

peft writes the adapters (`adapter_config.json` + `adapter_model.safetensors`); safetensors reads them.
Every adapter's A and B matrices go into a preallocated bank, one per targeted projection:
`A: [max_loras + 1, in, max_rank]`, `B: [max_loras + 1, max_rank, out]`, with the LoRA scale folded
into B and row 0 all zeros (the base model). A step whose rows use different adapters computes the
base projection once for all rows and adds each row's `x @ A_i @ B_i`:

- eagerly, one small matmul pair per adapter present in the step, over that adapter's rows
  (grouped: cheap for long prompt pieces);
- in the fixed shapes of a CUDA graph, gathered per row with `bmm` (punica's BGMV idea, in plain torch):
  no data-dependent shapes, and row 0 of the bank makes the base rows add zero.

Embedding rows trained beside the adapter (peft trainable tokens) are kept per bank row by
`token_rows.TokenOverrides`; steps that use them run eagerly.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmsmith.errors import UserError
from lmsmith.serve.engine.token_rows import AdapterTokens, TokenOverrides, TokenSpace, extract_token_rows

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_WEIGHT_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")

Key = tuple[int, str]  # (layer index, projection name)


@dataclass(frozen=True)
class LoraInfo:
    """A loaded adapter, as `Engine.loras()` lists it."""

    name: str
    path: str
    rank: int
    target_modules: tuple[str, ...]


@dataclass
class LoraWeights:
    info: LoraInfo
    pairs: dict[Key, tuple[torch.Tensor, torch.Tensor]]  # A [in, r], scaled B [r, out]
    tokens: AdapterTokens = field(default_factory=AdapterTokens)


def read_peft_adapter(name: str, path: str | Path, shapes: dict[Key, tuple[int, int]],
                      space: TokenSpace | None = None) -> LoraWeights:
    """Read a peft LoRA folder and check it fits the base model (`shapes`: (in, out) per projection;
    `space`: the embedding that trained token rows must fit, None to refuse such rows)."""
    folder = Path(path)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"{folder}: not a peft adapter folder (no adapter_config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_file}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{config_file}: peft_type is {config.get('peft_type')!r}; only LORA adapters are served")
    for unsupported in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(unsupported):
            raise UserError(f"{config_file}: {unsupported} is not supported by the serving engine")
    raw = _read_weights(folder)
    tokens = AdapterTokens() if space is None else extract_token_rows(raw, config, folder, space)
    found: dict[Key, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        match = _WEIGHT_KEY.search(key)
        if match is None or match.group(2) not in PROJECTIONS:
            raise UserError(f"{folder}: weight {key!r} is not a LoRA on an attention or MLP projection")
        found.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = tensor
    if not found and not tokens:
        raise UserError(f"{folder}: the adapter holds no LoRA weights")
    alpha = float(config.get("lora_alpha", 8))
    pairs: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, parts in sorted(found.items()):
        if set(parts) != {"A", "B"} or key not in shapes:
            raise UserError(f"{folder}: layer {key[0]} {key[1]}: incomplete LoRA pair or no such projection in the base")
        a, b = parts["A"], parts["B"]  # peft: A [r, in], B [out, r]
        rank = a.shape[0]
        if (a.shape[1], b.shape[0]) != shapes[key] or b.shape[1] != rank:
            raise UserError(
                f"{folder}: layer {key[0]} {key[1]}: LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} "
                f"do not fit the base projection (in, out) = {shapes[key]}"
            )
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pairs[key] = (a.t().float(), (b.t().float() * scale))
    ranks = {pair[0].shape[1] for pair in pairs.values()}
    targets = {key[1] for key in pairs}
    targets |= {"embed_tokens"} if tokens.embedding is not None else set()
    targets |= {"lm_head"} if tokens.head is not None else set()
    info = LoraInfo(name, str(folder), max(ranks, default=0), tuple(sorted(targets)))
    return LoraWeights(info, pairs, tokens)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    safetensors_file = folder / "adapter_model.safetensors"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file))
    bin_file = folder / "adapter_model.bin"
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise UserError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")


@dataclass(frozen=True)
class LoraPlan:
    """Which adapter each token of a step uses, in the form the bank needs.

    `segments`: (bank row, token indices or None for all tokens) per adapter present (eager steps);
    `rows`: the bank row of every token (fixed-shape steps).
    """

    segments: tuple[tuple[int, torch.Tensor | None], ...] = ()
    rows: torch.Tensor | None = None


class LoraBank:
    """Adapters resident on the device, addressed by bank row; row 0 is the base model."""

    def __init__(self, shapes: dict[Key, tuple[int, int]], max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device, vocab: int):
        self.shapes = shapes
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.a: dict[Key, torch.Tensor] = {}
        self.b: dict[Key, torch.Tensor] = {}
        self.rank = [0] * (max_loras + 1)
        self.targets: list[frozenset[Key]] = [frozenset()] * (max_loras + 1)
        self.rows: dict[str, int] = {}
        self.infos: dict[str, LoraInfo] = {}
        self.version = 0  # bumped when the bank's tensors are (re)allocated: captured graphs are stale
        self.vocab = vocab
        self.tokens = TokenOverrides(dtype, device)

    @property
    def active(self) -> bool:
        return bool(self.rows)

    def install(self, weights: LoraWeights) -> int:
        name = weights.info.name
        if name in self.rows:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
        if weights.info.rank > self.max_rank:
            raise UserError(
                f"{weights.info.path}: rank {weights.info.rank} is above the engine's max_lora_rank {self.max_rank}"
            )
        taken = set(self.rows.values())
        free = [row for row in range(1, self.max_loras + 1) if row not in taken]
        if not free:
            raise ValueError(f"{self.max_loras} LoRA adapters are loaded already; remove one first")
        row = free[0]
        for key, (a, b) in weights.pairs.items():
            if key not in self.a:
                size_in, size_out = self.shapes[key]
                slots = self.max_loras + 1
                self.a[key] = torch.zeros(slots, size_in, self.max_rank, dtype=self.dtype, device=self.device)
                self.b[key] = torch.zeros(slots, self.max_rank, size_out, dtype=self.dtype, device=self.device)
                self.version += 1
            rank = a.shape[1]
            self.a[key][row, :, :rank] = a.to(self.dtype)
            self.b[key][row, :rank] = b.to(self.dtype)
        self.rank[row] = weights.info.rank
        self.targets[row] = frozenset(weights.pairs)
        self.tokens.install(row, weights.tokens, self.vocab)
        self.rows[name] = row
        self.infos[name] = weights.info
        return row

    def remove(self, name: str) -> int:
        row = self.rows.pop(name)
        self.infos.pop(name)
        for key in self.targets[row]:
            self.a[key][row].zero_()
            self.b[key][row].zero_()
        self.rank[row] = 0
        self.targets[row] = frozenset()
        self.tokens.remove(row)
        return row

    def plan(self, token_rows: list[int], device: torch.device) -> LoraPlan | None:
        """The eager plan for a step whose tokens use these bank rows; None when no token uses an adapter."""
        present = sorted(set(token_rows) - {0})
        if not present:
            return None
        if len(present) == 1 and 0 not in token_rows:
            return LoraPlan(segments=((present[0], None),))
        rows = torch.tensor(token_rows, device=device)
        return LoraPlan(segments=tuple((row, (rows == row).nonzero().squeeze(1)) for row in present))

    def delta(self, key: Key, x: torch.Tensor, plan: LoraPlan) -> torch.Tensor | None:
        """What the adapters add to projection `key`'s output for `x` ([tokens, in]); None when nothing."""
        a_bank = self.a.get(key)
        if a_bank is None:
            return None
        b_bank = self.b[key]
        if plan.rows is not None:
            # Fixed shapes: every row gathers its own A and B (row 0 is zeros).
            low = torch.bmm(x.unsqueeze(1), a_bank[plan.rows])
            return torch.bmm(low, b_bank[plan.rows]).squeeze(1)
        out: torch.Tensor | None = None
        for row, tokens in plan.segments:
            if key not in self.targets[row]:
                continue
            rank = self.rank[row]
            a, b = a_bank[row, :, :rank], b_bank[row, :rank]
            if tokens is None:
                return (x @ a) @ b
            if out is None:
                out = torch.zeros(x.shape[0], b.shape[1], dtype=x.dtype, device=x.device)
            out.index_add_(0, tokens, (x[tokens] @ a) @ b)
        return out
