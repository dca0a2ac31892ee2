"""Executes one engine step: a single forward pass over every scheduled token, decodes and prompt pieces mixed.

transformers supplies the model's modules (embedding, RMSNorms, rotary embedding, activation, LM head);
this module runs its decoder layers itself, so one pass can carry many sequences at different positions
without padding. The step's tokens are packed into one `[tokens, hidden]` matrix for every projection,
and the projections are fused and, on CPU, laid out for a few-row kernel (`projections.py`). Attention is torch's
`scaled_dot_product_attention` over the slot KV cache:

- all decode rows at once (one query each, masked past each position), reading their slots in place
  when they are a contiguous run (decode rows are ordered by slot, so they usually are), else gathered;
- each prompt piece over a view of its own slot (causal, offset by what is already cached).

Only rows that sample (decodes, and prompt pieces that reach the prompt's end) go through the final norm
and the LM head. Decoder-only models of the Llama family (Qwen2/Qwen3, Llama, Mistral without sliding
windows) are supported. The runner never decides what runs; it executes the scheduler's plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmsmith.errors import UserError
from lmsmith.serve.engine.config import ResolvedEngineConfig
from lmsmith.serve.engine.cuda_graphs import DecodeGraphs
from lmsmith.serve.engine.kv_cache import SlotKVCache
from lmsmith.serve.engine.lora import PROJECTIONS, Key, LoraBank, LoraPlan, LoraWeights
from lmsmith.serve.engine.projections import (
    LayerProjections,
    Projection,
    build_layer_projections,
    choose_row_kernel,
    packing_supported,
)
from lmsmith.serve.engine.scheduler import ScheduledChunk
from lmsmith.serve.engine.token_rows import TokenSpace

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")

log = logging.getLogger("lmsmith.serve")


@dataclass
class PromptPiece:
    """A prompt piece's place in the packed batch and in its slot."""

    offset: int  # first packed row
    count: int
    slot: int
    start: int  # position of its first token
    mask: torch.Tensor | None  # None: plain causal (the piece starts the prompt)


@dataclass
class StepBatch:
    """Tensors of one step; decode rows come first in the packed order, then prompt pieces."""

    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    slots: torch.Tensor  # [tokens] KV slot of each token
    num_decode: int
    decode_key_len: int  # keys read by the decode rows
    decode_slot_start: int | None = None  # the decode rows' slots are start, start + 1, ... (read in place)
    pieces: list[PromptPiece] = field(default_factory=list)
    sample_rows: torch.Tensor | None = None  # rows that produce logits; None: all
    lora: LoraPlan | None = None
    sample_lora_rows: list[int] | None = None  # adapter bank row of each sampled row (eager steps with adapters)


@dataclass
class StepLogits:
    """A step's logits [rows, vocab]: one row per sampling chunk, in order, then each `prompt` chunk's rows."""

    sampling: list[ScheduledChunk]
    logits: torch.Tensor
    prompt: list[tuple[ScheduledChunk, int]] = field(default_factory=list)  # (chunk, rows), after the sampling rows


def check_supported(model) -> None:
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"model_type {model_type!r} is not supported by the serving engine (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        raise UserError("sliding-window attention is not supported by the serving engine")
    if model_type == "mistral" and getattr(config, "sliding_window", None):
        raise UserError("sliding-window attention is not supported by the serving engine")


class ModelRunner:
    """Owns the KV cache, the LoRA bank and the decode graphs; turns scheduled chunks into logits."""

    def __init__(self, model, config: ResolvedEngineConfig):
        check_supported(model)
        self.model = model
        self.config = config
        self.device = next(model.parameters()).device
        self.dtype = model.get_input_embeddings().weight.dtype
        model_config = model.config
        self.decoder = model.model
        self.layers = list(self.decoder.layers)
        self.num_heads = model_config.num_attention_heads
        self.num_kv_heads = getattr(model_config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // self.num_heads
        self.kv = SlotKVCache(len(self.layers), config.max_slots, self.num_kv_heads, config.max_model_len,
                              self.head_dim, self.dtype, self.device)
        self.lora = LoraBank(self.projection_shapes(), config.max_loras, config.max_lora_rank, self.dtype, self.device,
                             vocab=model.get_input_embeddings().num_embeddings)
        wanted = config.packed_weights if config.packed_weights is not None else self._packed_copy_fits()
        # None off CPU or without oneDNN: choose_row_kernel checks what this device and dtype support.
        self.row_kernel = (choose_row_kernel(self.device, self.dtype, rows_hint=min(max(config.max_slots, 4), 64))
                           if wanted else None)
        self.projections: list[LayerProjections] = build_layer_projections(self.layers, self.row_kernel)
        self.packed_weight_bytes = sum(
            getattr(projection, "packed_bytes", 0)
            for layer in self.projections for projection in (layer.qkv, layer.o, layer.gate_up, layer.down)
        )
        if self.row_kernel is not None:
            log.info("engine: %s row kernel, %.0f MB of packed weights", self.row_kernel.name,
                     self.packed_weight_bytes / 1e6)
        self._positions = torch.arange(config.max_model_len, device=self.device)
        self.graphs: DecodeGraphs | None = None
        if config.bucketed_decode:
            self.graphs = DecodeGraphs(
                self.forward, self._decode_batch, config.max_slots, config.graph_key_len_step,
                config.max_model_len, self.kv.scratch_slot, self.device, capture=config.cuda_graphs,
            )
        self._graph_lora_version = self.lora.version

    @property
    def packed_weights(self) -> bool:
        return self.row_kernel is not None

    def _packed_copy_fits(self) -> bool:
        if not packing_supported(self.device, self.dtype):
            return False  # no copy to make, so no need to ask how much memory is free
        import psutil

        copy_bytes = sum(in_features * out_features for in_features, out_features in self.projection_shapes().values())
        copy_bytes *= torch.finfo(self.dtype).bits // 8
        return copy_bytes <= psutil.virtual_memory().available // 2

    def projection_shapes(self) -> dict[Key, tuple[int, int]]:
        shapes = {}
        for index, layer in enumerate(self.layers):
            for name in PROJECTIONS:
                parent = layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
                module = getattr(parent, name)
                shapes[(index, name)] = (module.in_features, module.out_features)
        return shapes

    def token_space(self) -> TokenSpace:
        """What an adapter's trained token rows must fit; tied: the LM head reads the embedding's rows."""
        embedding = self.model.get_input_embeddings().weight
        head = self.model.get_output_embeddings()
        head_weight = getattr(head, "weight", None)  # a quantized head keeps no float weight
        tied = head_weight is not None and head_weight.data_ptr() == embedding.data_ptr()
        return TokenSpace(vocab=embedding.shape[0], hidden=embedding.shape[1], tied=tied)

    def install_lora(self, weights: LoraWeights) -> int:
        return self.lora.install(weights)

    # ----- one step -----

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> StepLogits:
        """Run the step: logits (float32) of the chunks that sample, and of the prompt rows asked for."""
        # By slot: a contiguous run of slots is read in place by the decode attention.
        decodes = sorted((chunk for chunk in chunks if chunk.count == 1), key=lambda chunk: chunk.seq.slot)
        pieces = [chunk for chunk in chunks if chunk.count > 1]
        if (self.graphs is not None and not pieces and len(decodes) <= self.graphs.max_batch
                and all(chunk.samples for chunk in decodes)
                and not self.lora.tokens.uses({chunk.seq.lora_index for chunk in decodes})):
            return StepLogits(decodes, self._run_bucketed(decodes))
        ordered = decodes + pieces
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        lora_rows: list[int] = []
        for chunk in ordered:
            seq = chunk.seq
            token_ids.extend(seq.token_ids[chunk.start:chunk.start + chunk.count])
            positions.extend(range(chunk.start, chunk.start + chunk.count))
            slots.extend([seq.slot] * chunk.count)
            lora_rows.extend([seq.lora_index] * chunk.count)
        packed = torch.tensor([token_ids, positions, slots], dtype=torch.long).to(self.device, non_blocking=True)
        batch = StepBatch(
            input_ids=packed[0], positions=packed[1], slots=packed[2], num_decode=len(decodes),
            decode_key_len=max((chunk.start + 1 for chunk in decodes), default=0),
            decode_slot_start=_contiguous_start([chunk.seq.slot for chunk in decodes]),
            lora=self.lora.plan(lora_rows, self.device) if self.lora.active else None,
        )
        # Rows that need logits: each sampling chunk's last row, then the prompt rows whose logprobs a
        # request asked for (row p predicts the prompt's token p + 1).
        sampling: list[ScheduledChunk] = []
        sample_rows: list[int] = []
        prompt: list[tuple[ScheduledChunk, int]] = []
        prompt_rows: list[int] = []
        offset = 0
        for chunk in ordered:
            if chunk.count > 1:
                mask = None
                if chunk.start > 0:
                    queries = self._positions[chunk.start:chunk.start + chunk.count]
                    mask = self._positions[:chunk.start + chunk.count].unsqueeze(0) <= queries.unsqueeze(1)
                batch.pieces.append(PromptPiece(offset, chunk.count, chunk.seq.slot, chunk.start, mask))
            if chunk.samples:
                sampling.append(chunk)
                sample_rows.append(offset + chunk.count - 1)
            wanted = chunk.prompt_rows_wanted
            if wanted:
                prompt.append((chunk, wanted))
                prompt_rows.extend(range(offset, offset + wanted))
            offset += chunk.count
        rows = sample_rows + prompt_rows
        if rows != list(range(offset)):
            batch.sample_rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        if batch.lora is not None:
            batch.sample_lora_rows = [lora_rows[row] for row in rows]
        return StepLogits(sampling, self.forward(batch), prompt)

    def _run_bucketed(self, decodes: list[ScheduledChunk]) -> torch.Tensor:
        assert self.graphs is not None
        if self.lora.version != self._graph_lora_version:
            self.graphs.clear()  # the bank's tensors moved; graphs captured before point at old memory
            self._graph_lora_version = self.lora.version
        return self.graphs.run(
            [chunk.seq.token_ids[chunk.start] for chunk in decodes],
            [chunk.start for chunk in decodes],
            [chunk.seq.slot for chunk in decodes],
            [chunk.seq.lora_index for chunk in decodes],
            self.lora.version if self.lora.active else None,
        )

    def _decode_batch(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                      key_len: int, lora_rows: torch.Tensor | None) -> StepBatch:
        """A decode-only batch in fixed shapes (what the CUDA graphs capture)."""
        return StepBatch(
            input_ids=input_ids, positions=positions, slots=slots, num_decode=input_ids.shape[0],
            decode_key_len=key_len, lora=None if lora_rows is None else LoraPlan(rows=lora_rows),
        )

    # ----- the forward pass -----

    def forward(self, batch: StepBatch) -> torch.Tensor:
        hidden = self.decoder.embed_tokens(batch.input_ids)
        if batch.lora is not None and batch.lora.segments:
            hidden = self.lora.tokens.apply_to_embeddings(hidden, batch.input_ids, batch.lora.segments)
        cos, sin = self.decoder.rotary_emb(hidden, batch.positions.unsqueeze(0))
        rotary = (cos[0].unsqueeze(1), sin[0].unsqueeze(1))  # [tokens, 1, head_dim]
        decode_mask = None
        if batch.num_decode:
            decode_positions = batch.positions[:batch.num_decode]
            keys = self._positions[:batch.decode_key_len]
            decode_mask = (keys.unsqueeze(0) <= decode_positions.unsqueeze(1))[:, None, None, :]
        for index, (layer, projections) in enumerate(zip(self.layers, self.projections)):
            attended = self._attention(index, layer, projections, layer.input_layernorm(hidden), batch, rotary,
                                       decode_mask)
            hidden = hidden + attended
            hidden = hidden + self._mlp(index, layer.mlp, projections, layer.post_attention_layernorm(hidden),
                                        batch.lora)
        if batch.sample_rows is not None:
            hidden = hidden.index_select(0, batch.sample_rows)
        normed = self.decoder.norm(hidden)
        logits = self.model.lm_head(normed).float()
        if batch.sample_lora_rows is not None:
            logits = self.lora.tokens.apply_to_logits(logits, normed, batch.sample_lora_rows)
        return logits

    def _with_lora(self, out: torch.Tensor, key: Key, x: torch.Tensor, lora: LoraPlan | None) -> torch.Tensor:
        if lora is not None:
            delta = self.lora.delta(key, x, lora)
            if delta is not None:
                return out + delta
        return out

    def _project(self, key: Key, projection: Projection, x: torch.Tensor, lora: LoraPlan | None) -> torch.Tensor:
        return self._with_lora(projection(x), key, x, lora)

    def _mlp(self, index: int, mlp: torch.nn.Module, projections: LayerProjections, x: torch.Tensor,
             lora: LoraPlan | None) -> torch.Tensor:
        gate, up = projections.gate_up(x).split(projections.mlp_width, dim=-1)
        gate = self._with_lora(gate, (index, "gate_proj"), x, lora)
        up = self._with_lora(up, (index, "up_proj"), x, lora)
        return self._project((index, "down_proj"), projections.down, mlp.act_fn(gate) * up, lora)

    def _attention(self, index: int, layer: torch.nn.Module, projections: LayerProjections, x: torch.Tensor,
                   batch: StepBatch, rotary: tuple[torch.Tensor, torch.Tensor],
                   decode_mask: torch.Tensor | None) -> torch.Tensor:
        attn = layer.self_attn
        tokens = x.shape[0]
        q, k, v = projections.qkv(x).split(projections.qkv_sizes, dim=-1)
        q = self._with_lora(q, (index, "q_proj"), x, batch.lora).reshape(tokens, self.num_heads, self.head_dim)
        k = self._with_lora(k, (index, "k_proj"), x, batch.lora).reshape(tokens, self.num_kv_heads, self.head_dim)
        v = self._with_lora(v, (index, "v_proj"), x, batch.lora).reshape(tokens, self.num_kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises queries and keys per head
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = rotary
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self.kv.write(index, batch.slots, batch.positions, k, v)
        gqa = self.num_kv_heads != self.num_heads
        parts = []
        if batch.num_decode:
            if batch.decode_slot_start is not None:
                keys, values = self.kv.run(index, batch.decode_slot_start, batch.num_decode, batch.decode_key_len)
            else:
                keys, values = self.kv.gather(index, batch.slots[:batch.num_decode], batch.decode_key_len)
            out = F.scaled_dot_product_attention(
                q[:batch.num_decode].unsqueeze(2), keys, values, attn_mask=decode_mask,
                scale=attn.scaling, enable_gqa=gqa,
            )
            parts.append(out.squeeze(2))
        for piece in batch.pieces:
            keys, values = self.kv.view(index, piece.slot, piece.start + piece.count)
            query = q[piece.offset:piece.offset + piece.count].transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=piece.mask, is_causal=piece.mask is None,
                scale=attn.scaling, enable_gqa=gqa,
            )
            parts.append(out[0].transpose(0, 1))
        attended = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._project((index, "o_proj"), projections.o, attended.reshape(tokens, -1), batch.lora)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _contiguous_start(slots: list[int]) -> int | None:
    """The first slot when `slots` are consecutive and ascending, else None."""
    if slots and slots[-1] - slots[0] == len(slots) - 1 and all(b == a + 1 for a, b in zip(slots, slots[1:])):
        return slots[0]
    return None
