"""`lmsmith export RUN --to hf|adapter|vllm|gguf`: one command over the export code the sft stage itself uses.

- `hf`: the tuned model as a plain HF folder. An adapter is merged onto the base it was trained on
  (a QLoRA base loaded in 4 bits and dequantized) and, unless `--no-verify`, the merged model's logits
  are checked against the adapter's on a probe; full and layer-freeze runs copy their model.
- `adapter`: the peft adapter folder, its base stored as an absolute path, with its tokenizer.
- `vllm`: an adapter vLLM's `--lora-modules` loads. One that also trained embedding rows (peft trainable
  tokens, the default `train_tokens: used`) is split: the rows merged into a copy of the base (`base/`),
  the LoRA weights alone in `adapter/`, checked to compute what the original computes. Anything else
  vLLM refuses (DoRA, non-LoRA, `modules_to_save`) is reported, with `--to hf` as the way out.
- `gguf`: the tuned model (an adapter merged first) as one GGUF file at `--quant` (f32, f16, bf16, q8_0,
  q4_0), written by `lmsmith.compress.gguf_file` with the `gguf` package alone (no compiled llama.cpp),
  then read back and its logits checked against the source model's.

Every export is written beside its destination and renamed into place when complete, with an
`export.json` saying what it came from. peft and transformers do the loading and merging.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from lmsmith.artifacts import Manifest, recover_folder, replace_folder
from lmsmith.console import console
from lmsmith.errors import UserError
from lmsmith.hashing import hash_path
from lmsmith.schema import StrictModel
from lmsmith.train.export import ADAPTER_CONFIG, merge_adapter, probe_ids, read_method, vllm_problems

PROMPT_LEARNING = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")
VERIFY_TOLERANCE = 1e-3  # max |logit difference|: fp32 merging rounds at about 1e-5 on ordinary logits


class ExportConfig(StrictModel):
    """What `lmsmith export` writes and where."""

    run: Path = Field(..., description="A run folder (its sft stage is exported) or a peft adapter folder.")
    to: Literal["hf", "adapter", "vllm", "gguf", "gguf-lora"] = Field(
        ..., description="hf: merged model folder; adapter: peft adapter; vllm: an adapter vLLM's --lora-modules "
        "loads; gguf: one GGUF file for llama.cpp (no compiled llama.cpp needed); gguf-lora: a base GGUF and the "
        "adapter as a GGUF LoRA for llama.cpp's --lora.")
    quant: Literal["f32", "f16", "bf16", "q8_0", "q4_0"] = Field("q8_0", description="gguf, gguf-lora: the (base) "
                                                                   "weights' type (norms, biases and LoRA "
                                                                   "matrices stay at 16 or 32 bits).")
    out: Optional[Path] = Field(None, description="Destination folder (default: RUN/exports/<to>; for an adapter "
                                "folder ADAPTER-<to> beside it).")
    base_model: Optional[Path] = Field(None, description="Base model folder, when the adapter's recorded one "
                                       "has moved (it must be the same weights: the check below cannot tell).")
    verify: bool = Field(True, description="hf: compare the merged model's logits with the adapter model's; gguf: "
                         "the GGUF's (read back, dequantized) with the source model's.")
    force: bool = Field(False, description="Replace an existing destination folder.")


def _sources(run: Path) -> tuple[Path | None, Path | None]:
    """(adapter folder, full model folder) of a run folder's sft stage, or of an adapter folder."""
    run = run.expanduser()
    if (run / ADAPTER_CONFIG).is_file():
        return run, None
    stage_dir = run / "sft"
    manifest = Manifest.read(stage_dir)
    if manifest is None:
        raise UserError(f"{run}: neither a run folder with a finished sft stage (no sft/manifest.json) nor a "
                        f"peft adapter folder (no {ADAPTER_CONFIG})")
    adapter = manifest.output_path(stage_dir, "adapter") if "adapter" in manifest.outputs else None
    model = manifest.output_path(stage_dir, "model") if "model" in manifest.outputs else None
    return adapter, model


def _mergeable(adapter: Path) -> bool:
    """LoRA kin and IA3 fold into the weights; prompt learning (prefix, prompt tuning) does not."""
    peft_type = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("peft_type")
    return peft_type not in PROMPT_LEARNING


def verify_merge(adapter_dir: Path, merged_dir: Path, base_model: Path | None) -> float:
    """Max |logit difference| between the adapter on its base (loaded as trained) and the merged folder."""
    import torch
    from peft import PeftModel

    from lmsmith.train.model import load_causal_lm

    if base_model is None:
        base_model = Path(json.loads((adapter_dir / ADAPTER_CONFIG).read_text())["base_model_name_or_path"])
    merged, tokenizer = load_causal_lm(merged_dir, source=str(merged_dir))
    ids = probe_ids(tokenizer)
    with torch.no_grad():
        expected = merged.eval()(input_ids=ids).logits
        del merged
        method = read_method(adapter_dir)
        quantized = getattr(method, "name", None) == "qlora"
        base, _ = load_causal_lm(base_model, source="export base model", method=method if quantized else None)
        if quantized:
            from lmsmith.train.methods import keep_fp32_cpu_kernel

            keep_fp32_cpu_kernel(base)  # the forward training ran, not bitsandbytes' bf16 inference kernel
        adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
        return float((adapted(input_ids=ids).logits - expected).abs().max())


def _write(out: Path, force: bool, build) -> None:
    """Build (and check) into `out`'s staging sibling; only a complete export replaces `out`."""
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: exists and is not empty; pass --force to replace it")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(out)
    build(staging)
    replace_folder(staging, out)


def _export_vllm_split(adapter: Path, out: Path, config: ExportConfig, base_model: Path | None) -> dict:
    """vLLM ignores trained embedding rows: they go into a copy of the base (out/base) and the LoRA weights
    alone into out/adapter; checked to compute what the original adapter computes before replacing `out`."""
    from lmsmith.train.export import split_token_rows

    record: dict = {"adapter": str(adapter), "split": "trained embedding rows merged into base/, LoRA in adapter/"}

    def build(target: Path) -> None:
        base_copy, adapter_copy = split_token_rows(adapter, target, base_model)
        problems = vllm_problems(adapter_copy)
        if problems:
            raise UserError(f"{adapter}: even without its embedding rows vLLM would refuse it: {'; '.join(problems)}")
        error = verify_split(adapter, base_model, base_copy, adapter_copy)
        record["verify_max_abs_logit_diff"] = error
        if error > VERIFY_TOLERANCE:
            raise UserError(f"{out}: base copy + LoRA differ from the original adapter by {error:.3g} (over "
                            f"{VERIFY_TOLERANCE}), so nothing was replaced; use --to hf")
        # The adapter folder names the base copy at its final place.
        final = json.loads((adapter_copy / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        final["base_model_name_or_path"] = str(out / "base")
        (adapter_copy / ADAPTER_CONFIG).write_text(json.dumps(final, indent=2, sort_keys=True), encoding="utf-8")

    _write(out, config.force, build)
    rank = json.loads((out / "adapter" / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("r")
    console.print(f"serve with: vllm serve {out / 'base'} --enable-lora --max-lora-rank {rank} "
                  f"--lora-modules {config.run.resolve().name}={out / 'adapter'}", soft_wrap=True)
    return record


def verify_split(adapter: Path, base_model: Path | None, base_copy: Path, adapter_copy: Path) -> float:
    """Max |logit difference| between the original adapter on its base and the LoRA-only adapter on the copy."""
    import torch

    from lmsmith.train.export import load_adapted

    original, tokenizer = load_adapted(adapter, base_model)
    ids = probe_ids(tokenizer)
    with torch.no_grad():
        expected = original.eval()(input_ids=ids).logits
        del original
        split, _ = load_adapted(adapter_copy, base_copy)
        return float((split.eval()(input_ids=ids).logits - expected).abs().max())


def _verified_line(report: dict, quant: str, what: str) -> str:
    from lmsmith.compress.gguf_file import VERIFY_BOUNDS

    figures = (f"logits within {report['relative_logit_diff']:.2g} of the largest source logit, argmax agreement "
               f"{report['argmax_agreement']:.3f}")
    if VERIFY_BOUNDS[quant][0] is None:
        return f"{what} {quant} is not gated (its rounding has no fixed bound): {figures}"
    return f"verified: {what} {figures}"


def _export_gguf_lora(adapter: Path, out: Path, config: ExportConfig, base_model: Path | None) -> dict:
    """`out/<name>-base-<quant>.gguf` and `out/<name>-lora-f16.gguf`; trained embedding rows go into the base
    first (as for vLLM). Checked together against the adapter model before they replace `out`."""
    import tempfile

    from lmsmith.compress.gguf_file import verify_gguf, write_gguf, write_gguf_lora
    from lmsmith.train.export import load_adapted, split_token_rows

    record: dict = {"quant": config.quant, "adapter": str(adapter)}
    name = config.run.expanduser().resolve().name

    def build(target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".split-") as scratch:
            lora_source, base_source = adapter, base_model
            if any(problem.startswith("trainable_token_indices") for problem in vllm_problems(adapter)):
                base_source, lora_source = split_token_rows(adapter, Path(scratch), base_model)
                record["split"] = "trained embedding rows merged into the base GGUF"
            if base_source is None:
                base_source = Path(json.loads((adapter / ADAPTER_CONFIG).read_text())["base_model_name_or_path"])
            base_file = write_gguf(base_source, target / f"{name}-base-{config.quant}.gguf", config.quant)
            lora_file = write_gguf_lora(lora_source, target / f"{name}-lora-f16.gguf", "f16", base_source)
            record.update({"base_file": base_file.path.name, "lora_file": lora_file.path.name,
                           "kept_higher": base_file.kept_higher, "lora_tensors": lora_file.tensors})
            if config.verify:
                adapted, tokenizer = load_adapted(adapter, base_model)
                record["verify"] = verify_gguf(adapted, tokenizer, base_file.path, config.quant, lora=lora_file.path)
                console.print(_verified_line(record["verify"], config.quant, "base + LoRA GGUF"))

    _write(out, config.force, build)
    console.print(f"run with: llama-cli -m {out / record['base_file']} --lora {out / record['lora_file']}",
                  soft_wrap=True)
    return record


def _export_gguf(adapter: Path | None, model: Path | None, out: Path, config: ExportConfig,
                 base_model: Path | None) -> dict:
    """The tuned model as `out/<name>-<quant>.gguf`, checked against its source before it replaces `out`."""
    import tempfile

    from lmsmith.compress.gguf_file import verify_gguf, write_gguf

    record: dict = {"quant": config.quant}

    def build(target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".merge-") as scratch:
            source = model
            if adapter is not None and _mergeable(adapter):
                source = merge_adapter(adapter, Path(scratch) / "merged", base_model)
                record["adapter"] = str(adapter)
            if source is None:
                raise UserError(f"{config.run}: a prompt-learning adapter has no merged form to write as GGUF")
            name = config.run.expanduser().resolve().name
            written = write_gguf(source, target / f"{name}-{config.quant}.gguf", config.quant)
            record.update({"file": written.path.name, "bytes": written.bytes, "tensors": written.tensors,
                           "kept_higher": written.kept_higher})
            if config.verify:
                record["verify"] = verify_gguf(source, None, written.path, config.quant)
                console.print(_verified_line(record["verify"], config.quant, "GGUF"))

    _write(out, config.force, build)
    return record


def _copy_adapter(adapter: Path, target: Path, base_model: Path | None) -> None:
    shutil.copytree(adapter, target)
    config_path = target / ADAPTER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    base = base_model or Path(config.get("base_model_name_or_path") or "")
    if base_model is not None or (base.exists() and not base.is_absolute()):
        config["base_model_name_or_path"] = str(base.resolve())
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def export_run(config: ExportConfig) -> dict:
    """Write the export `config` asks for; returns what `export.json` records."""
    adapter, model = _sources(config.run)
    # A run folder keeps its exports inside it; an adapter folder gets a sibling, since anything written
    # inside a published stage folder would make the pipeline see it as changed and rerun the stage.
    run = config.run.expanduser()
    default = run.with_name(f"{run.name}-{config.to}") if (run / ADAPTER_CONFIG).is_file() else run / "exports" / config.to
    out = (config.out or default).expanduser().resolve()
    base_model = config.base_model.expanduser().resolve() if config.base_model else None
    record: dict = {"to": config.to, "source": str(config.run.resolve())}
    if config.to == "hf":
        if adapter is not None and _mergeable(adapter):
            record["adapter"] = str(adapter)
            record["adapter_hash"] = hash_path(adapter)

            def merge_and_check(target: Path) -> None:
                merge_adapter(adapter, target, base_model)
                if not config.verify:
                    return
                error = verify_merge(adapter, target, base_model)
                record["verify_max_abs_logit_diff"] = error
                if error > VERIFY_TOLERANCE:
                    raise UserError(f"{out}: the merged model's logits differ from the adapter model's by {error:.3g} "
                                    f"(over {VERIFY_TOLERANCE}), so nothing was replaced; the merge is wrong for "
                                    "this adapter (please report it), or pass --no-verify to keep it anyway")
                console.print(f"verified: merged logits within {error:.2g} of the adapter model's")

            _write(out, config.force, merge_and_check)
        elif model is not None:
            _write(out, config.force, lambda target: shutil.copytree(model, target))
        else:
            raise UserError(f"{config.run}: a prompt-learning adapter has no merged form; use --to adapter")
    elif config.to == "gguf":
        record.update(_export_gguf(adapter, model, out, config, base_model))
    elif config.to == "gguf-lora":
        if adapter is None:
            raise UserError(f"{config.run}: the run trained no adapter (full or freeze method); use --to gguf")
        record.update(_export_gguf_lora(adapter, out, config, base_model))
    else:
        if adapter is None:
            raise UserError(f"{config.run}: the run trained no adapter (full or freeze method); use --to hf")
        if config.to == "vllm":
            problems = vllm_problems(adapter)
            token_rows_only = problems and all(problem.startswith("trainable_token_indices") for problem in problems)
            if token_rows_only:
                record.update(_export_vllm_split(adapter, out, config, base_model))
                (out / "export.json").write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
                console.print(f"[green]exported[/] vllm: {out}", soft_wrap=True)
                return record
            if problems:
                raise UserError(f"{adapter}: vLLM would refuse this adapter: {'; '.join(problems)}. "
                                "Export the merged model instead (--to hf), which vLLM serves as a plain model")
        _write(out, config.force, lambda target: _copy_adapter(adapter, target, base_model))
        record["adapter_hash"] = hash_path(out)
        written = json.loads((out / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        base = record["base_model"] = written["base_model_name_or_path"]
        if config.to == "vllm":
            console.print(f"serve with: vllm serve {base} --enable-lora --max-lora-rank {written.get('r')} "
                          f"--lora-modules {config.run.resolve().name}={out}", soft_wrap=True)
        elif problems := vllm_problems(out):
            console.print(f"[yellow]note[/] vLLM would not load this adapter: {'; '.join(problems)}")
    (out / "export.json").write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    console.print(f"[green]exported[/] {config.to}: {out}", soft_wrap=True)
    return record
