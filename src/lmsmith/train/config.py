"""Configs for the pretrain and sft stages. The model, optimiser and method blocks are shared."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from lmsmith.paths import InputPath
from lmsmith.schema import StrictModel
from lmsmith.train.method_config import (  # noqa: F401  (re-exported)
    DistillationConfig,
    FullMethod,
    LoraMethod,
    MethodConfig,
    PrivacyConfig,
)


class TinyModelConfig(StrictModel):
    """A from-scratch Qwen2-architecture model (transformers' `Qwen2Config`)."""

    architecture: Literal["qwen2"] = "qwen2"
    hidden_size: int = Field(256, ge=16)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(688, ge=16)
    max_position_embeddings: int = Field(1024, ge=64)
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        return self


class OptimConfig(StrictModel):
    """AdamW with linear warmup then cosine decay; norms and biases get no weight decay."""

    lr: float = Field(1e-3, gt=0, description="Peak learning rate, reached after warmup.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a share of `lr`.")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Share of the steps spent warming up.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this.")
    betas: tuple[float, float] = (0.9, 0.95)


class EarlyStoppingConfig(StrictModel):
    """Stop when a validation figure has not improved for `patience` val checks; keep the best weights."""

    metric: str = Field(
        "val_loss", pattern=r"^(val_loss|val_rouge_l|val\.[^.\s]+\.[A-Za-z0-9_]+)$",
        description="val_loss (lower is better), val_rouge_l (sft only, higher is better), or an sft val task's "
        "metric as val.TASK.METRIC, e.g. val.finance-yoy.numeric_acc (higher is better except perplexity, "
        "edit_rate and extraction_failure_rate).",
    )
    patience: int = Field(3, ge=1, description="Val checks without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smaller changes do not count as an improvement.")


class WandbConfig(StrictModel):
    """Log to Weights & Biases (the `wandb` library) beside TensorBoard."""

    project: str = Field("lmsmith", description="W&B project of the runs.")
    entity: Optional[str] = Field(None, description="W&B team or user; None: the account's default entity.")
    run_name: Optional[str] = Field(None, description="Display name of the run; None: W&B picks one.")
    mode: Optional[Literal["online", "offline"]] = Field(
        None,
        description="online uploads as it trains; offline writes STAGE/wandb/ (or WANDB_DIR) for `wandb sync` "
        "later. None: the WANDB_MODE environment variable, else online.",
    )
    tags: list[str] = Field(default_factory=list, description="Tags attached to the run.")


class MlflowConfig(StrictModel):
    """Log to MLflow (the `mlflow` library; `mlflow-skinny` is enough) beside TensorBoard."""

    tracking_uri: Optional[str] = Field(
        None,
        description="A tracking server (http://host:5000), a database (sqlite:///path/mlflow.db), a file: URI "
        "(MLflow's file store, which MLflow 3 keeps only for old setups) or a plain folder path, which gets an "
        "sqlite database mlflow.db and an artifacts/ folder. None: MLFLOW_TRACKING_URI, else MLflow's default "
        "(sqlite ./mlflow.db). The database backends need sqlalchemy and alembic.",
    )
    experiment: str = Field("lmsmith", description="MLflow experiment of the runs (created when missing).")
    run_name: Optional[str] = Field(None, description="Name of the run; None: MLflow picks one.")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, value: Optional[str]) -> Optional[str]:
        # The config is written to manifests, recipe.json and the trackers' own params: a password in
        # the URI would be published with every run.
        if value and "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("holds credentials (user:password@host); pass them in MLFLOW_TRACKING_USERNAME / "
                             "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead, never in the recipe")
        return value


class MonitorConfig(StrictModel):
    """TensorBoard logging, optional W&B and MLflow tracking, the MFU estimate and the training alerts."""

    tensorboard: bool = Field(True, description="Write TensorBoard event files to STAGE/tensorboard/.")
    wandb: Optional[WandbConfig] = Field(None, description="Also log to Weights & Biases (None: off).")
    mlflow: Optional[MlflowConfig] = Field(None, description="Also log to MLflow (None: off).")
    loss_spike_factor: float = Field(3.0, gt=1, description="Alert when a step's loss exceeds k × its moving average.")
    grad_norm_factor: float = Field(10.0, gt=1, description="Alert when the gradient norm exceeds k × its moving average.")
    ema_beta: float = Field(0.9, gt=0, lt=1, description="Smoothing of those moving averages.")
    divergence_factor: float = Field(
        2.0,
        gt=1,
        description="loss_divergence alert: the loss level (median of the last 9 step losses, so a few odd batches "
        "cannot trigger it) exceeds k × the lowest baseline reached so far (a median of up to 27 steps; the first "
        "step alone until 9 exist), and by at least divergence_min_rise.",
    )
    divergence_min_rise: float = Field(
        0.5, ge=0, description="Least rise (nats) over the lowest baseline that counts as divergence, so a run "
        "whose loss is near zero does not alert on ordinary noise."
    )
    trend_window: int = Field(
        12, ge=6, description="Step losses in the least-squares fit of the loss_rising alert; also the steps "
        "without its condition after which either divergence alert may fire again."
    )
    trend_rise: float = Field(
        0.25,
        gt=0,
        description="loss_rising alert: the least-squares line through the last trend_window step losses climbs "
        "by more than this share of the window's lowest loss, steadily (slope over 7 standard errors). Fits "
        "start at 6 steps.",
    )
    warmup_steps: int = Field(
        10,
        ge=0,
        description="Steps before spike and explosion alerts are armed. The divergence and rising-loss alerts "
        "are armed from step 1, with their margins (divergence_factor - 1, trend_rise) doubled at the start and "
        "tightening linearly to the set values by this step.",
    )
    gpu_util_min: float = Field(30.0, ge=0, le=100, description="On GPU: alert under this utilisation (%).")
    gpu_memory_max: float = Field(95.0, ge=0, le=100, description="On GPU: alert over this memory use (%).")
    cpu_peak_tflops: float = Field(
        1.0, gt=0, description="Peak matmul TFLOP/s of this CPU, for the MFU estimate (GPUs are looked up)."
    )


class EfficiencyConfig(StrictModel):
    """Speed and memory switches; none of them changes the loss."""

    packing: bool = Field(
        False,
        description="sft: pack several conversations into one row of up to max_len tokens; pretrain: restart "
        "positions at each document. position_ids restart per document and attention stays inside it.",
    )
    chunked_loss: bool = Field(
        True, description="Linear + cross-entropy over chunks of target positions: never the full logits tensor."
    )
    loss_chunk_size: int = Field(1024, ge=1, description="Target positions per chunk of the loss.")
    gradient_checkpointing: bool = Field(False, description="Recompute layer activations in backward: less memory, ~30% slower.")
    liger: bool = Field(True, description="Use Liger kernels on CUDA when liger-kernel is installed.")
    compile: bool = Field(False, description="torch.compile each decoder layer (slow start, faster steps on GPU).")


class TrainingSchedule(StrictModel):
    """How long and in what portions to train, and how often to log and validate."""

    run_control_fields = frozenset({"resume", "checkpoint_every", "keep_checkpoints", "log_every", "monitor"})

    batch_size: int = Field(16, ge=1, description="Sequences per micro-batch.")
    grad_accum_steps: int = Field(
        1, ge=1, description="Micro-batches per optimiser step; the loss is averaged over all their target tokens."
    )
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimiser steps.")
    optim: OptimConfig = OptimConfig()
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Matrix precision while training: bf16 autocast, with the weights that train in fp32 and, "
        "for adapter methods (LoRA, DoRA, IA3, prompt learning), the frozen base loaded in bf16; auto: bf16 where "
        "the CPU or GPU has native bf16, else fp32. DP-SGD always runs in fp32. Saved weights are always fp32.",
    )
    attention: Literal["eager", "sdpa"] = Field(
        "eager",
        description="Attention kernel while training. On CPU, eager is faster for short sequences: "
        "sdpa's flash-attention backward dominated the step time in measurements.",
    )
    log_every: int = Field(5, ge=1, description="Write a metrics.jsonl row every N optimiser steps.")
    val_every: Optional[int] = Field(
        None, ge=1, description="Measure val loss every N steps (None: four times over the run); always at the end."
    )
    early_stopping: Optional[EarlyStoppingConfig] = Field(None, description="None: train every step.")
    checkpoint_every: Optional[int] = Field(
        50, ge=1, description="Save a resumable checkpoint to RUN/.checkpoints/<stage>/ every N steps (None: never)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept while training.")
    resume: Union[bool, Literal["auto"]] = Field(
        False,
        description="Continue from the newest checkpoint of this stage, exactly where it stopped: true refuses to "
        "start when there is none, auto starts afresh then.",
    )
    monitor: MonitorConfig = MonitorConfig()
    on_non_finite: Literal["stop", "skip_step"] = Field(
        "stop",
        description="A step whose loss or gradient is not finite: stop the run (the stage fails and publishes "
        "nothing; its checkpoints stay for a resume with a lower lr), or skip_step: drop that update, count it, "
        "and stop after `max_skipped_steps` in a row.",
    )
    max_skipped_steps: int = Field(3, ge=1, description="With on_non_finite: skip_step, non-finite steps in a row "
                                   "that stop the run.")
    efficiency: EfficiencyConfig = EfficiencyConfig()
    sharding: Literal["none", "fsdp2"] = Field(
        "none",
        description="fsdp2: shard weights, gradients and optimiser state over the launched processes with "
        "torch's fully_shard (works on CPU/gloo too). Under an accelerate FSDP or DeepSpeed config leave none.",
    )


class PretrainConfig(TrainingSchedule):
    """Continued pretraining (causal LM) on the cleaned corpus."""

    base_model: Optional[InputPath] = Field(
        None, description="A local HF causal-LM folder to continue from; None builds `model` from scratch."
    )
    model: TinyModelConfig = TinyModelConfig()
    seq_len: int = Field(256, ge=16, description="Length of the packed training blocks.")
    # The embedded corpus is small (about 75k tokens): many passes keep improving val loss without
    # overfitting, and 12 take about 1-1.5 minutes on 2 cores.
    epochs: float = Field(12.0, gt=0)
    optim: OptimConfig = OptimConfig(lr=2e-3)

    @model_validator(mode="after")
    def _watches_val_loss(self) -> "PretrainConfig":
        # Pretraining measures val loss only: any other metric would never arrive and never stop the run.
        if self.early_stopping is not None and self.early_stopping.metric != "val_loss":
            raise ValueError(f"early_stopping.metric {self.early_stopping.metric}: pretraining measures val_loss only")
        return self


class ReplayConfig(StrictModel):
    """Rehearsal against forgetting: blocks of the data stage's pretraining corpus (`corpus_train`) mixed
    into the SFT rows and trained with the plain language-model loss on every token."""

    token_share: float = Field(
        ..., gt=0, lt=1, description="Share of each epoch's target tokens that come from corpus blocks (0.2: one "
        "corpus token for every four answer tokens). Blocks are drawn without repeats until the corpus runs out."
    )
    seq_len: int = Field(256, ge=16, description="Tokens per corpus block (at most sft.max_len).")


class SFTConfig(TrainingSchedule):
    """Supervised fine-tuning on chat-formatted instructions with answer-only loss."""

    base_model: Optional[InputPath] = Field(
        None, description="A local HF causal-LM folder; None takes the pretrain stage's model."
    )
    method: MethodConfig = LoraMethod()
    max_len: int = Field(384, ge=16, description="Longer conversations are skipped (and counted), not cut.")
    val_generations: int = Field(
        4, ge=0, description="Val conversations answered greedily at each val check and scored by ROUGE-L (0: off)."
    )
    val_max_new_tokens: int = Field(48, ge=1, description="Token budget of those answers.")
    val_tasks: list[str] = Field(
        default_factory=list,
        description="Eval tasks scored at each val check (`lmsmith eval` task files, or finance-suite): their "
        "headline metrics go to metrics.jsonl and TensorBoard as val.TASK.METRIC, and early stopping can watch them.")
    val_task_items: int = Field(32, ge=1, description="Items of each val task scored at a val check.")
    distill: Optional[DistillationConfig] = Field(None, description="Distil from a teacher (KL + CE) instead of plain CE.")
    privacy: Optional[PrivacyConfig] = Field(
        None, description="Train with DP-SGD (opacus) and report ε at the given δ; no packing, resume or accumulation."
    )
    class_weights: bool = Field(
        False,
        description="Weigh each conversation's loss by its task's weight from the data stage's class_weights "
        "output (the loss stays a weighted per-token mean).",
    )
    oversample: dict[str, float] = Field(
        default_factory=dict,
        description="Repeat the training conversations of a task (the record's `task` field), or those the data "
        "stage tagged (`tag:<name>`, e.g. tag:rare_cluster from its coverage step), this many times per epoch, "
        "e.g. {yoy: 2.0, tag:rare_cluster: 3.0}; a conversation takes the largest factor that applies; "
        "fractions repeat a seeded share.",
    )
    replay: Optional[ReplayConfig] = Field(
        None, description="Mix blocks of the pretraining corpus into the SFT rows, against forgetting (None: off)."
    )
    epochs: float = Field(5.0, gt=0)
    optim: OptimConfig = OptimConfig(lr=2e-3)

    @model_validator(mode="after")
    def _compatible(self) -> "SFTConfig":
        if self.replay is not None and self.replay.seq_len > self.max_len:
            raise ValueError(f"replay.seq_len ({self.replay.seq_len}) must not exceed max_len ({self.max_len})")
        if self.early_stopping is not None and self.early_stopping.metric == "val_rouge_l" and not self.val_generations:
            raise ValueError("early_stopping.metric val_rouge_l needs val_generations > 0")
        if self.early_stopping is not None and self.early_stopping.metric.startswith("val.") and not self.val_tasks:
            raise ValueError(f"early_stopping.metric {self.early_stopping.metric} watches a val task; list it in "
                             "val_tasks")
        if "held-out" in self.val_tasks:
            raise ValueError("val_tasks: held-out is the run's test split, which training must not see; the val "
                             "split is scored by val_loss and val_rouge_l")
        if self.privacy is not None:
            # opacus samples its own batches and clips per example: none of these fit its accounting.
            clashes = [name for name, on in (("efficiency.packing", self.efficiency.packing), ("resume", self.resume),
                                             ("distill", self.distill is not None), ("class_weights", self.class_weights),
                                             ("oversample", bool(self.oversample)), ("grad_accum_steps > 1",
                                             self.grad_accum_steps > 1), ("sharding", self.sharding != "none"),
                                             ("on_non_finite: skip_step", self.on_non_finite == "skip_step"),
                                             ("replay", self.replay is not None))
                       if on]
            if clashes:
                raise ValueError(f"privacy cannot be combined with {', '.join(clashes)}")
        if self.efficiency.packing and self.method.name in ("prefix", "prompt"):
            raise ValueError(f"efficiency.packing: {self.method.name} tuning sets its own positions, so packed "
                             "documents would see each other; turn packing off")
        if self.distill is not None and self.efficiency.packing:
            raise ValueError("distill scores whole padded rows; turn off efficiency.packing to distil")
        if self.class_weights and self.efficiency.packing:
            raise ValueError("class_weights weigh whole conversations; turn off efficiency.packing to use them")
        return self
