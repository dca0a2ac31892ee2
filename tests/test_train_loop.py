"""The loop's validation features: early stopping with best-weight restore, the ROUGE-L generation probe,
the objective hook, oversampling, and the recipes that drive them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model
from lmsmith.recipe import load_recipe
from lmsmith.train.config import EarlyStoppingConfig, MonitorConfig, OptimConfig, TrainingSchedule
from lmsmith.train.data import Example, StepPlan, chat_example, eval_batches, oversample
from lmsmith.eval.tasks import TaskConfig, read_items
from lmsmith.train.forward import evaluate, loss_sum
from lmsmith.train.loop import GenerationProbe, train
from test_packing import CONVERSATIONS

ROOT = Path(__file__).resolve().parents[1]


def schedule(**overrides) -> TrainingSchedule:
    settings = dict(batch_size=4, max_steps=12, log_every=1, val_every=1, precision="fp32", checkpoint_every=None,
                    optim=OptimConfig(lr=3e-2, warmup_ratio=0.0), monitor=MonitorConfig(tensorboard=False))
    return TrainingSchedule(**{**settings, **overrides})


def conflicting_data(vocab: int = 50) -> tuple[list[Example], list[Example]]:
    """Train on `a b → c`, validate on `a b → d`: every step that fits the training data hurts val loss."""
    train_rows = [Example(input_ids=[3, 4, 5] * 4, labels=[3, 4, 5] * 4) for _ in range(16)]
    val_rows = [Example(input_ids=[3, 4, 6] * 4, labels=[3, 4, 6] * 4) for _ in range(4)]
    return train_rows, val_rows


def tiny(vocab: int = 50):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


def test_early_stopping_stops_after_patience_and_restores_the_best_weights(tmp_path):
    train_rows, val_rows = conflicting_data()
    model = tiny()
    val = eval_batches(val_rows, pad_id=0, batch_size=4)
    plan = StepPlan(train_rows, pad_id=0, batch_size=4, epochs=10, max_steps=12)
    config = schedule(early_stopping=EarlyStoppingConfig(metric="val_loss", patience=2))
    summary = train(model, plan, plan.total_steps, config, tmp_path, val_batches=val)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Replay the rule on the logged curve: stop at the second check in a row without a new best.
    best, best_step, misses, expected_stop = float("inf"), 0, 0, None
    for row in rows:
        if row["val_loss"] < best:
            best, best_step, misses = row["val_loss"], row["step"], 0
        else:
            misses += 1
            if misses == 2:
                expected_stop = row["step"]
                break
    assert expected_stop is not None and expected_stop < 12  # fitting a → c eventually hurts a → d
    assert summary.steps == expected_stop == rows[-1]["step"] == summary.extra["stopped_early_at"]
    assert summary.extra["best_step"] == best_step < expected_stop
    # The model handed back is the one from the best check, not the last step.
    assert evaluate(model, val) == pytest.approx(best, abs=1e-5)
    assert summary.val_loss == best


def test_early_stopping_keeps_going_while_val_improves(tmp_path):
    train_rows, _ = conflicting_data()
    val = eval_batches(train_rows[:4], pad_id=0, batch_size=4)
    plan = StepPlan(train_rows, pad_id=0, batch_size=4, epochs=10, max_steps=6)
    summary = train(tiny(), plan, plan.total_steps, schedule(early_stopping=EarlyStoppingConfig(patience=2)),
                    tmp_path, val_batches=val)
    assert summary.steps == 6 and "stopped_early_at" not in summary.extra


def test_generation_probe_scores_rouge_l_at_each_val_check(tmp_path, tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer)
    examples = [chat_example(tiny_tokenizer, messages) for messages in CONVERSATIONS]
    probe = GenerationProbe(tokenizer=tiny_tokenizer, prompts=[c[:-1] for c in CONVERSATIONS[:2]],
                            references=[c[-1]["content"] for c in CONVERSATIONS[:2]], max_new_tokens=8)
    model.train()
    score = probe.scores(model)["val_rouge_l"]
    assert 0.0 <= score <= 100.0
    assert model.training  # generation ran in eval mode and handed the model back in train mode
    # A reference scored against itself through a probe whose "model" parrots it gets 100.
    from lmsmith.eval.metrics import rouge_l

    assert rouge_l(probe.references, probe.references) == pytest.approx(100.0)
    plan = StepPlan(examples, pad_id=tiny_tokenizer.pad_token_id, batch_size=2, epochs=2, max_steps=4)
    summary = train(model, plan, plan.total_steps, schedule(val_every=2, max_steps=4), tmp_path, probes=[probe])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "val_rouge_l" in row] == [2, 4]
    assert summary.extra["val_rouge_l"] == rows[-1]["val_rouge_l"]


def letter_task(tmp_path: Path) -> tuple[TaskConfig, list[Example]]:
    """A 16-question multiple-choice task, and training examples that state each question's gold letter."""
    from lmsmith.eval.suite import format_question

    rows = ["question,A,B,C,D,answer"] + [f"第{i}题：毛利率？,毛利/营收{i},净利/营收,营收/资产,负债/资产,{'ABCD'[i % 4]}"
                                          for i in range(16)]
    (tmp_path / "mc.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    task = TaskConfig(name="mc", type="multiple_choice", dataset=tmp_path / "mc.csv")
    return task, [format_question(task, item.question, item.options) + " " + "ABCD"[item.gold]
                  for item in read_items(task)]


def test_val_tasks_are_scored_at_each_check_and_early_stopping_can_watch_them(tmp_path, tiny_tokenizer):
    from lmsmith.eval.probe import TaskProbe

    task, texts = letter_task(tmp_path)
    examples = [Example(input_ids=ids, labels=ids) for ids in tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]]
    probe = TaskProbe([task], tiny_tokenizer, batch_size=8)
    assert probe.metric_names() == ["val.mc.acc"]
    plan = StepPlan(examples, pad_id=tiny_tokenizer.pad_token_id, batch_size=16, epochs=80, max_steps=80)
    config = schedule(max_steps=80, val_every=8, batch_size=16, optim=OptimConfig(lr=3e-3, warmup_ratio=0.0),
                      early_stopping=EarlyStoppingConfig(metric="val.mc.acc", patience=3))
    model = build_tiny_model(tiny_tokenizer, seed=5)
    summary = train(model, plan, plan.total_steps, config, tmp_path / "run", probes=[probe])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    curve = [(row["step"], row["val.mc.acc"]) for row in rows if "val.mc.acc" in row]
    assert [step for step, _ in curve][:3] == [8, 16, 24]
    assert max(acc for _, acc in curve) >= 75.0 > curve[0][1]  # learning the letters shows in the probe
    best_step, best = max(curve, key=lambda point: (point[1], -point[0]))
    if best_step != summary.steps:  # the best check's weights were restored
        assert summary.extra["best_val.mc.acc"] == best and summary.extra["best_step"] == best_step
    assert summary.extra["val.mc.acc"] == best  # what is handed back is the best check's model
    if "stopped_early_at" in summary.extra:  # it stops after two checks without a new best
        assert summary.extra["stopped_early_at"] == curve[-1][0] and len(curve) >= 3


def test_lower_is_better_for_loss_perplexity_and_edit_rate():
    from lmsmith.train.loop import higher_is_better

    assert not higher_is_better("val_loss") and higher_is_better("val_rouge_l")
    assert higher_is_better("val.finance-yoy.numeric_acc") and not higher_is_better("val.docs.perplexity")
    assert not higher_is_better("val.report.edit_rate")


def test_the_objective_hook_replaces_the_loss(tmp_path):
    """A class-weighted objective (here: every token counts double) flows through training and validation."""
    train_rows, val_rows = conflicting_data()
    calls = []

    def doubled(model, batch):
        calls.append(batch.input_ids.shape[0])
        loss, count = loss_sum(model, batch)
        return loss * 2.0, count

    plan = StepPlan(train_rows, pad_id=0, batch_size=4, epochs=1, max_steps=2)
    val = eval_batches(val_rows, pad_id=0, batch_size=4)
    summary = train(tiny(), plan, plan.total_steps, schedule(max_steps=2), tmp_path, val_batches=val, objective=doubled)
    plain = evaluate(tiny(), val)
    assert len(calls) == 2 + 2 * len(val)  # two training batches, then the val batches at each check
    assert summary.history[0]["loss"] == pytest.approx(2 * plain, rel=0.05)


def test_oversampling_repeats_a_task_by_its_factor():
    rows = [Example(input_ids=[i, i], labels=[i, i]) for i in range(100)]
    tasks = ["rare" if i < 10 else "common" for i in range(100)]
    labels = [[task] for task in tasks]
    result = oversample(rows, labels, {"rare": 3.0, "common": 0.5}, seed=0)
    rare = sum(1 for e in result if e.input_ids[0] < 10)
    common = len(result) - rare
    assert rare == 30
    assert 30 <= common <= 60  # a seeded half of the common ones
    assert oversample(rows, labels, {"rare": 3.0, "common": 0.5}, seed=0) == result


def test_oversampling_by_a_data_stage_tag_takes_the_largest_factor_that_applies():
    rows = [Example(input_ids=[i, i], labels=[i, i]) for i in range(20)]
    labels = [["yoy", "tag:rare_cluster"] if i < 5 else ["yoy"] for i in range(20)]
    result = oversample(rows, labels, {"yoy": 2.0, "tag:rare_cluster": 4.0}, seed=0)
    assert sum(1 for e in result if e.input_ids[0] < 5) == 20 and len(result) == 20 + 30


def test_sft_oversample_refuses_a_tag_no_conversation_carries(sft_upstream, tmp_path):
    from lmsmith.errors import UserError

    with pytest.raises(UserError, match="no training conversation has the task or tag tag:rare_cluster"):
        run_sft(sft_upstream, tmp_path, oversample={"tag:rare_cluster": 2.0})


@pytest.mark.parametrize("recipe", ["recipes/two-stage.yaml", "recipes/finance-demo.yaml"])
def test_shipped_recipes_validate(recipe):
    loaded = load_recipe(ROOT / recipe)
    if recipe.endswith("two-stage.yaml"):
        assert loaded.pretrain.efficiency.packing and loaded.sft.base_model is None  # sft takes stage 1's model
        assert loaded.sft.early_stopping.metric == "val_rouge_l" and loaded.sft.val_generations > 0


def test_accelerate_configs_name_their_strategy():
    import yaml

    kinds = {path.name: yaml.safe_load(path.read_text())["distributed_type"]
             for path in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert kinds == {"ddp.yaml": "MULTI_GPU", "fsdp2.yaml": "FSDP", "deepspeed-zero2.yaml": "DEEPSPEED",
                     "deepspeed-zero3.yaml": "DEEPSPEED", "multi-node-ddp.yaml": "MULTI_GPU"}
    fsdp = yaml.safe_load((ROOT / "configs/accelerate/fsdp2.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2
    for name, stage in (("deepspeed-zero2.yaml", 2), ("deepspeed-zero3.yaml", 3)):
        assert yaml.safe_load((ROOT / "configs/accelerate" / name).read_text())["deepspeed_config"]["zero_stage"] == stage


# ---------------------------------------------------------------- sft stage: objectives and DP-SGD through the loop


@pytest.fixture(scope="module")
def sft_upstream(tmp_path_factory, tiny_model_dir) -> Path:
    from test_resume import upstream as make_upstream

    return make_upstream.__wrapped__(tmp_path_factory, tiny_model_dir)


def run_sft(upstream: Path, folder: Path, **settings) -> dict:
    import shutil

    from lmsmith.artifacts import Manifest
    from lmsmith.pipeline import run_pipeline
    from lmsmith.recipe import Recipe
    from lmsmith.train.config import SFTConfig

    for stage in ("data", "tokenizer", "pretrain"):
        shutil.copytree(upstream / stage, folder / stage)
    defaults = dict(batch_size=4, max_steps=3, log_every=1, val_generations=0, monitor=MonitorConfig(tensorboard=False))
    run_pipeline(Recipe(pretrain={}, sft=SFTConfig(**{**defaults, **settings})), folder, only="sft")
    return Manifest.read(folder / "sft").metrics


def test_sft_with_dp_sgd_reports_epsilon(sft_upstream, tmp_path):
    metrics = run_sft(sft_upstream, tmp_path, method={"name": "lora", "r": 4, "train_tokens": "none"},
                      privacy={"noise_multiplier": 1.0, "delta": 1e-3})
    assert metrics["dp_steps"] == 3 and 0 < metrics["dp_epsilon"] < 50 and metrics["dp_delta"] == 1e-3
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [row["dp_epsilon"] for row in rows] == sorted(row["dp_epsilon"] for row in rows)  # ε only grows


def test_sft_class_weights_come_from_the_data_stage(sft_upstream, tmp_path):
    from lmsmith.artifacts import Manifest, describe_outputs
    from lmsmith.errors import UserError

    with pytest.raises(UserError, match="class_weights"):
        run_sft(sft_upstream, tmp_path / "none", class_weights=True)
    folder = tmp_path / "weighted"
    (folder / "data").mkdir(parents=True)
    data = Manifest.read(sft_upstream / "data")
    (folder / "data" / "class_weights.json").write_text(json.dumps({"weights": {"extract": 2.0}}))
    import shutil

    for stage in ("tokenizer", "pretrain"):
        shutil.copytree(sft_upstream / stage, folder / stage)
    for name in ("corpus", "sft"):
        shutil.copytree(sft_upstream / "data" / name, folder / "data" / name)
    outputs = {name: entry["path"] for name, entry in data.outputs.items()} | {"class_weights": "class_weights.json"}
    Manifest(stage="data", config={}, config_hash="handmade", inputs={},
             outputs=describe_outputs(folder / "data", outputs)).write(folder / "data")
    from lmsmith.pipeline import run_pipeline
    from lmsmith.recipe import Recipe
    from lmsmith.train.config import SFTConfig

    settings = SFTConfig(batch_size=4, max_steps=2, log_every=1, val_generations=0, class_weights=True,
                         monitor=MonitorConfig(tensorboard=False))
    run_pipeline(Recipe(pretrain={}, sft=settings), folder, only="sft")
    assert Manifest.read(folder / "sft").metrics["steps"] == 2


def test_weighted_batches_normalise_by_the_weighted_target_count():
    from dataclasses import replace

    from lmsmith.train.data import collate

    rows = [Example(input_ids=[1, 2, 3, 4], labels=[1, 2, 3, 4]), Example(input_ids=[5, 6], labels=[5, 6])]
    plain = collate(rows, pad_id=0)
    assert plain.sample_weights is None and plain.target_weight == plain.target_tokens == 4
    weighted = collate([replace(rows[0], weight=2.0), rows[1]], pad_id=0)
    assert weighted.sample_weights.tolist() == [2.0, 1.0]
    assert weighted.target_weight == 2.0 * 3 + 1.0 * 1


def test_contradictory_sft_settings_are_refused():
    from pydantic import ValidationError

    from lmsmith.train.config import SFTConfig

    for settings, message in (
        ({"privacy": {"noise_multiplier": 1.0, "delta": 1e-5}, "efficiency": {"packing": True}}, "packing"),
        ({"class_weights": True, "efficiency": {"packing": True}}, "packing"),
        ({"method": {"name": "prompt"}, "efficiency": {"packing": True}}, "own positions"),
        ({"early_stopping": {"metric": "val_rouge_l"}, "val_generations": 0}, "val_generations"),
    ):
        with pytest.raises(ValidationError, match=message):
            SFTConfig(**settings)


def test_sft_val_tasks_are_checked_before_training(tmp_path, tiny_tokenizer):
    from pydantic import ValidationError

    from lmsmith.errors import UserError
    from lmsmith.pipeline import StageContext
    from lmsmith.recipe import Recipe
    from lmsmith.train.config import SFTConfig
    from lmsmith.train.sft import val_probes

    with pytest.raises(ValidationError, match="list it in val_tasks"):
        SFTConfig(early_stopping={"metric": "val.mc.acc"})
    with pytest.raises(ValidationError, match="held-out is the run's test split"):
        SFTConfig(val_tasks=["held-out"])
    with pytest.raises(ValidationError, match="early_stopping.metric"):
        SFTConfig(val_tasks=["x.yaml"], early_stopping={"metric": "val.mc acc"})
    task, _ = letter_task(tmp_path)
    (tmp_path / "mc.yaml").write_text(f"name: mc\ntype: multiple_choice\ndataset: {task.dataset}\n", encoding="utf-8")
    ctx = StageContext(run_dir=tmp_path, stage_dir=tmp_path / "sft", recipe=Recipe(pretrain={}, sft={}))
    config = SFTConfig(val_tasks=[str(tmp_path / "mc.yaml")], val_task_items=5, val_generations=0,
                       early_stopping={"metric": "val.mc.gen_acc"})
    with pytest.raises(UserError, match=r"val.mc.gen_acc is not measured; the val tasks give val.mc.acc"):
        val_probes(config, tiny_tokenizer, [], ctx)
    [probe] = val_probes(config.model_copy(update={"early_stopping": None}), tiny_tokenizer, [], ctx)
    assert [task.limit for task in probe.tasks] == [5]
    evaluated = StageContext(run_dir=tmp_path, stage_dir=tmp_path / "sft",
                             recipe=Recipe(pretrain={}, sft={}, eval={"tasks": [str(tmp_path / "mc.yaml")]}))
    with pytest.raises(UserError, match="also what the eval stage scores"):
        val_probes(config.model_copy(update={"early_stopping": None}), tiny_tokenizer, [], evaluated)
    from lmsmith.train.config import PretrainConfig

    with pytest.raises(ValidationError, match="pretraining measures val_loss only"):
        PretrainConfig(early_stopping={"metric": "val_rouge_l"})


def test_dp_sgd_runs_through_the_same_recipe_and_its_rows_carry_epsilon_not_a_global_norm(sft_upstream, tmp_path):
    run_sft(sft_upstream, tmp_path, method={"name": "lora", "r": 4, "train_tokens": "none"},
            privacy={"noise_multiplier": 1.0, "delta": 1e-3})
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all("dp_epsilon" in row and "grad_norm" not in row and "val_loss" in rows[-1] for row in rows)


def test_loop_state_round_trips_through_json_and_refuses_unknown_fields():
    from lmsmith.errors import UserError
    from lmsmith.train.loop import LoopState

    state = LoopState(total_tokens=7, last_loss=2.0, history=[{"step": 1, "loss": 2.0}], skipped_steps=1)
    state.interval.add(3.0, 2, 10, 0.5, 0.1)
    again = LoopState.from_json(json.loads(json.dumps(state.to_json())))
    assert again == state and again.interval.row(2, 1e-3)["loss"] == 1.5
    with pytest.raises(UserError, match="unknown loop fields extra"):
        LoopState.from_json({**state.to_json(), "extra": 1})


def test_replay_mixes_corpus_blocks_into_sft_at_the_asked_token_share(sft_upstream, tmp_path):
    from lmsmith.pipeline import StageContext
    from lmsmith.recipe import Recipe
    from lmsmith.tokenizer.records import read_conversations
    from lmsmith.train.config import SFTConfig
    from lmsmith.train.data import IGNORE_INDEX
    from lmsmith.train.model import load_tokenizer
    from lmsmith.train.sft import chat_examples, replay_examples

    replay = {"token_share": 0.25, "seq_len": 32}
    metrics = run_sft(sft_upstream, tmp_path, replay=replay)
    config = SFTConfig(replay=replay)
    ctx = StageContext(run_dir=tmp_path, stage_dir=tmp_path / "sft", recipe=Recipe(pretrain={}, sft=config))
    tokenizer = load_tokenizer(ctx.artifact("pretrain", "model"))
    examples, _ = chat_examples(tokenizer, read_conversations(ctx.artifact("data", "sft_train")), config.max_len,
                                "render sft_train")
    blocks = replay_examples(config, ctx, tokenizer, examples)
    assert metrics["replay_rows"] == len(blocks) and metrics["replay_tokens"] == 32 * len(blocks)
    assert metrics["train_rows"] == metrics["train_examples"] + len(blocks)
    assert all(len(block) == 32 and block.labels == block.input_ids for block in blocks)  # every token a target
    answers = sum(sum(label != IGNORE_INDEX for label in example.labels[1:]) for example in examples)
    corpus = 31 * len(blocks)
    assert abs(corpus / (corpus + answers) - 0.25) <= 31 / (corpus + answers)  # within one block of the share
    distinct = {tuple(block.input_ids) for block in blocks}
    assert len(distinct) == len(blocks)  # no repeats while the corpus lasts


def test_replay_settings_that_cannot_work_are_refused():
    from pydantic import ValidationError

    from lmsmith.train.config import SFTConfig

    with pytest.raises(ValidationError, match="replay.seq_len"):
        SFTConfig(max_len=64, replay={"token_share": 0.2, "seq_len": 128})
    with pytest.raises(ValidationError, match="privacy cannot be combined with replay"):
        SFTConfig(replay={"token_share": 0.2}, privacy={"noise_multiplier": 1.0, "delta": 1e-5})
    with pytest.raises(ValidationError, match="token_share"):
        SFTConfig(replay={"token_share": 1.0})
