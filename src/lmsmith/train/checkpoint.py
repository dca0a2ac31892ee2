"""Checkpoints for exact resume: trained weights, optimiser, scheduler, RNG states and the loop's position.

A checkpoint is a folder `step-<N>/` under the stage's checkpoint root, `RUN/.checkpoints/<stage>/`,
which lies outside the stage folder so that the pipeline's fresh start of a stage does not erase it. It
holds:

- `trainable.safetensors`: the parameters that train (all of them for full fine-tuning, only the
  adapter's for LoRA and kin: the frozen rest is rebuilt from the base model exactly as on the first run);
- `optimizer.pt`, `scheduler.pt`: torch state dicts;
- `rng-<rank>.safetensors` / `rng-<rank>.json`: torch (and CUDA) generator states as tensors, python's
  and numpy's as JSON, of each process (nothing in a checkpoint is unpickled beyond plain containers);
- `state.json`: the step, the loop's running figures (metric sums, EMAs, early stopping) and a
  fingerprint of the settings, so a resume under different settings is refused rather than mixed.

It is written to a temporary folder and renamed into place, so a run killed while saving leaves the
previous checkpoint as the latest. Under FSDP or DeepSpeed, whose weights and optimiser states are
sharded across processes, accelerate's `save_state` / `load_state` write the tensors instead.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmsmith.artifacts import checkpoint_root  # noqa: F401  (re-exported: stages import it from here)
from lmsmith.errors import UserError

PREFIX = "step-"
STATE = "state.json"
WEIGHTS = "trainable.safetensors"


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX))


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (their `state.json` is written last), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / STATE).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator is not None and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _save_rng_state(staging: Path, rank: int) -> None:
    """Every generator's state as plain data: torch's as tensors (safetensors), Python's and numpy's as
    JSON, so resuming unpickles nothing."""
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{index}": state for index, state in enumerate(torch.cuda.get_rng_state_all())}
    save_file(tensors, str(staging / f"rng-{rank}.safetensors"))
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)]}
    (staging / f"rng-{rank}.json").write_text(json.dumps(plain))


def _load_rng_state(path: Path, rank: int) -> None:
    from safetensors.torch import load_file

    tensors_file, plain_file = path / f"rng-{rank}.safetensors", path / f"rng-{rank}.json"
    if not (tensors_file.exists() and plain_file.exists()):
        return
    tensors = load_file(str(tensors_file))
    plain = json.loads(plain_file.read_text())
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{index}"] for index in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that train, by name, as CPU copies (never views of the live weights)."""
    return {name: param.detach().to("cpu", copy=True).contiguous()
            for name, param in model.named_parameters() if param.requires_grad}


def save_checkpoint(
    root: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    loop_state: dict[str, Any],
    fingerprint: dict[str, Any],
    accelerator=None,
    keep: int = 2,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write checkpoint `step` (every process calls this) and keep only the newest `keep`.

    `extra_tensors`: named tensor sets the loop keeps besides the live weights (the best weights so
    far, for early stopping), each saved as `<name>.safetensors`.
    """
    from safetensors.torch import save_file

    rank = accelerator.process_index if accelerator is not None else 0
    is_main = accelerator is None or accelerator.is_main_process
    final = root / f"{PREFIX}{step}"
    staging = root / f".{PREFIX}{step}.tmp"
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier(accelerator)
    if _sharded(accelerator):
        accelerator.save_state(str(staging / "accelerate"))
    elif is_main:
        unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
        save_file(trainable_state(unwrapped), str(staging / WEIGHTS))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
    if is_main:
        for name, tensors in (extra_tensors or {}).items():
            save_file(tensors, str(staging / f"{name}.safetensors"))
    _save_rng_state(staging, rank)
    _barrier(accelerator)
    if is_main:
        (staging / STATE).write_text(json.dumps({"step": step, "fingerprint": fingerprint, "loop": loop_state}))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(accelerator)
    return final


# What a resume may change: the way out of a run stopped by a non-finite step is its last checkpoint with a
# lower peak learning rate (the caller re-applies it to the restored schedule).
RESUMABLE_CHANGES = ("optim.lr", "on_non_finite", "max_skipped_steps")


def _comparable(fingerprint: dict[str, Any]) -> dict[str, Any]:
    kept = {key: value for key, value in fingerprint.items() if key not in RESUMABLE_CHANGES}
    if isinstance(kept.get("optim"), dict):
        kept["optim"] = {key: value for key, value in kept["optim"].items() if f"optim.{key}" not in RESUMABLE_CHANGES}
    return kept


def load_checkpoint(
    path: Path, model, optimizer, scheduler, fingerprint: dict[str, Any], accelerator=None
) -> tuple[int, dict, dict[str, dict[str, torch.Tensor]]]:
    """Restore a checkpoint into the live objects; returns (step, loop state, extra tensor sets)."""
    from safetensors.torch import load_file

    state = json.loads((path / STATE).read_text())
    saved = _comparable(state["fingerprint"])
    fingerprint = _comparable(fingerprint)
    changed = sorted(key for key in set(saved) | set(fingerprint) if saved.get(key) != fingerprint.get(key))
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} → {fingerprint.get(key)!r}" for key in changed)
        raise UserError(f"{path}: cannot resume, the settings changed since this checkpoint ({details}); "
                        f"delete {path.parent} to start over")
    rank = accelerator.process_index if accelerator is not None else 0
    if _sharded(accelerator):
        accelerator.load_state(str(path / "accelerate"))
    else:
        unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
        tensors = load_file(str(path / WEIGHTS))
        expected = {name for name, param in unwrapped.named_parameters() if param.requires_grad}
        if set(tensors) != expected:
            raise UserError(f"{path / WEIGHTS}: holds other trainable parameters than this model's "
                            f"({len(set(tensors) ^ expected)} differ); was the method changed?")
        with torch.no_grad():
            params = dict(unwrapped.named_parameters())
            for name, tensor in tensors.items():
                params[name].copy_(tensor)
        # Tensors and plain containers only: a swapped checkpoint file cannot run code on load.
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _load_rng_state(path, rank)
    extras = {file.name.removesuffix(".safetensors"): load_file(str(file))
              for file in path.glob("*.safetensors") if file.name != WEIGHTS and not file.name.startswith("rng-")}
    return state["step"], state["loop"], extras


def _barrier(accelerator) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
