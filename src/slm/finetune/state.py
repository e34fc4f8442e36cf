"""Fine-tuning checkpoints for `slm finetune --resume`, and the checks that keep a run in --out safe.

    out/checkpoint/weights.safetensors        the trained parameters (the adapters with --lora, else every weight)
    out/checkpoint/trainer_state.safetensors  AdamW's state, the RNG states (dropout masks, batch order) and
                                              the current epoch's order of the rows
    out/checkpoint/trainer_state.json         the step, every step's loss so far, the validation losses, the
                                              settings that shape the run, the model's config, the data's hash

A checkpoint is written into a temporary sibling folder and swapped in by renames (checkpoint/hf.py's
atomic_folder, as `slm train` does), so a kill at any moment leaves the previous checkpoint
or the new one whole. It holds every state a step reads, so a resumed run continues as if it had
never stopped: the same batches, the same dropout masks, bitwise the same weights and losses.

Only safetensors and JSON are read back: nothing is unpickled.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from ..checkpoint import hf
from ..checkpoint.safetensors_io import CheckpointError, read_header, read_into
from ..files import output_folder, read_json_object
from ..train.optim import state_tensors

CHECKPOINT = "checkpoint"
WEIGHTS, TENSORS, STATE = "weights.safetensors", "trainer_state.safetensors", "trainer_state.json"
# What a fine-tuning run (or a model) leaves in its folder: a new run must not silently replace them.
RUN_MARKERS = ("finetune.json", CHECKPOINT, "metrics.jsonl", "adapter_model.safetensors", "adapter_config.json",
               "model.safetensors", "model.safetensors.index.json", "config.json")
# Everything a run writes, removed by --overwrite so that no file of the old run is mistaken for
# the new one's (an old full model beside a new adapter, say).
RUN_FILES = RUN_MARKERS + ("loss.png", "receipt.json", "generation_config.json", "tokenizer.json",
                           "tokenizer_config.json", "chat_template.jinja", ".final")


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, CHECKPOINT)


def recover(out: str) -> None:
    """Undo a kill inside the last checkpoint's commit (hf.recover_folder)."""
    hf.recover_folder(checkpoint_dir(out))


def run_files(out: str) -> list[str]:
    """The names in `out` that show a fine-tuning run (or a model) is there."""
    return [n for n in RUN_MARKERS if os.path.exists(os.path.join(out, n))] if os.path.isdir(out) else []


def check_out(out: str, model: str, resume: bool, overwrite: bool) -> bool:
    """Check --out before any work: it is (or can be) a folder, not the model's own, and a run
    already there is replaced only with --overwrite. Returns whether there is a checkpoint to
    resume from (with resume=True; a run killed before its first checkpoint starts afresh)."""
    output_folder(out, "--out")
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if os.path.exists(model) and os.path.realpath(out) == os.path.realpath(model):
        raise ValueError(f"--out {out} is the --model folder; write the fine-tuned run to another folder")
    if overwrite:
        return False
    if resume:
        recover(out)
        if os.path.isdir(checkpoint_dir(out)):
            return True
        found = [n for n in run_files(out) if n != "metrics.jsonl"]  # metrics alone: killed before a checkpoint
        if "finetune.json" in found:
            raise ValueError(f"--resume: {out} holds a finished run (finetune.json) and no checkpoint, so there is "
                             "nothing to resume; pass --overwrite to train it again")
        if found:
            raise ValueError(f"--resume: {out} holds no checkpoint to resume, but {', '.join(found)}; "
                             "pass --overwrite to replace them")
        return False
    found = run_files(out)
    if found:
        raise ValueError(f"--out {out} already holds a fine-tuning run or model ({', '.join(found)}); "
                         "pass --resume to continue it, or --overwrite to replace it")
    return False


def clear_run(out: str) -> None:
    """--overwrite: remove what an earlier run wrote into out (only those files)."""
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    for path in glob.glob(os.path.join(out, "model-*-of-*.safetensors")) + \
            glob.glob(os.path.join(out, f".tmp-{CHECKPOINT}-*")):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def save(out: str, model: torch.nn.Module, optimizers, rng: dict[str, torch.Tensor], state: dict) -> None:
    """Write out/checkpoint atomically: the trainable parameters, the optimizers' state, `rng`
    (tensors of RNG states and the like) and `state` (JSON)."""
    path = checkpoint_dir(out)
    try:
        with hf.atomic_folder(path) as tmp:
            names = {id(p): n for n, p in model.named_parameters()}
            weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(weights, os.path.join(tmp, WEIGHTS))
            tensors = state_tensors(optimizers, names)
            tensors.update({k: v.detach().cpu().contiguous() for k, v in rng.items()})
            save_file(tensors, os.path.join(tmp, TENSORS))
            with open(os.path.join(tmp, STATE), "w") as f:
                json.dump(state, f, indent=1)
    except BaseException as e:
        if isinstance(e, OSError) or "(os error" in str(e):  # out of disk (also as safetensors' own error)
            before = "the previous checkpoint is intact: free space, then --resume" if os.path.isdir(path) \
                else "there is no earlier checkpoint"
            raise CheckpointError(f"could not write the checkpoint of step {state.get('step')} in {path} ({e}); "
                                  f"{before}") from e
        raise


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing, truncated or corrupt file is a CheckpointError
    naming it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing from the checkpoint; pass --overwrite to start the run again")
    out = {}
    for name, info in read_header(path).items():
        out[name] = torch.empty(info.shape, dtype=info.dtype)
        read_into(path, info, out[name])
    return out


def load(out: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state, trainable weights, optimizer and RNG tensors) of out/checkpoint, each file checked."""
    ckpt = checkpoint_dir(out)
    state_path = os.path.join(ckpt, STATE)
    if not os.path.isfile(state_path):
        raise CheckpointError(f"{state_path}: missing from the checkpoint; pass --overwrite to start the run again")
    state = read_json_object(state_path)
    kinds = {"step": (int, "an integer"), "losses": (list, "a list"), "settings": (dict, "an object"),
             "model_config": (dict, "an object"), "data_sha256": (str, "a string")}
    for key, (kind, what) in kinds.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{state_path}: not the state of a fine-tuning checkpoint "
                                  f"({key!r} is missing or not {what})")
    if state["step"] < 0 or len(state["losses"]) != state["step"] or \
            not all(isinstance(x, (int, float)) for x in state["losses"]):
        raise CheckpointError(f"{state_path}: corrupt: step {state['step']} with {len(state['losses'])} losses")
    return state, read_tensors(os.path.join(ckpt, WEIGHTS)), read_tensors(os.path.join(ckpt, TENSORS))


def discard(out: str) -> None:
    """Remove out/checkpoint once the run's results are written: renamed first (one atomic step),
    so a kill meanwhile leaves either the whole checkpoint or a temporary folder `recover` clears."""
    path = checkpoint_dir(out)
    if os.path.isdir(path):
        gone = os.path.join(out, f".tmp-{CHECKPOINT}-done")
        shutil.rmtree(gone, ignore_errors=True)
        os.replace(path, gone)
        shutil.rmtree(gone, ignore_errors=True)
