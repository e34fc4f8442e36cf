"""Hugging Face model folders: config.json + (sharded) safetensors + tokenizer files.

`load_model` streams tensors shard by shard into a model allocated once in the target dtype
(checkpoint/loader.py), so peak memory stays near the model's own size. `save_model` writes the
same layout that `transformers.AutoModelForCausalLM.from_pretrained` reads, atomically. The tensor
names are the family's (model/families.py, `hf_names`); `hf_layout` maps them to our parameters.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..files import read_json_object
from ..model import Transformer, families
from ..model.config import ConfigError, ModelConfig
from ..quant.apply import StreamingQuantizer, mode_of
from ..quant.layers import LAYERS, QuantEmbedding, QuantLinear
from .loader import empty_storage, fill_model, hf_layout, load, new_empty_model
from .safetensors_io import CheckpointError, read_header, read_into


def read_json(path: str) -> dict:
    """A JSON object file of a model folder; anything else (missing, a folder, not JSON, nested
    too deeply, a list or null) is a CheckpointError naming the file."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        return read_json_object(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def read_config(path: str, hf: dict | None = None) -> ModelConfig:
    """ModelConfig from a model folder's config.json (or from `hf`, its contents already read)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such model folder")
    if hf is None:
        hf = read_json(cfg_path)
    try:
        return ModelConfig.from_hf(hf, name=os.path.basename(os.path.normpath(path)))
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


def weight_files(path: str) -> list[str]:
    """The safetensors files of a folder, refusing pickle-based checkpoints."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not files:
            raise CheckpointError(f"{index}: weight_map is empty")
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{index}: lists shard {missing[0]} which is missing from {path}")
        return [os.path.join(path, f) for f in files]
    if os.path.exists(single):
        return [single]
    found = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if found:
        return found
    pickles = [os.path.basename(p) for ext in ("bin", "pt", "pth", "ckpt")
               for p in glob.glob(os.path.join(path, f"*.{ext}"))]
    if pickles:
        raise CheckpointError(
            f"{path}: holds only pickle checkpoints ({', '.join(sorted(pickles))}). slm loads safetensors only, "
            "because unpickling can run arbitrary code. Convert it where you trust the file, e.g. "
            "`python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\"`")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json found")


def _quantized_layers(model: Transformer, qcfg: dict, headers: dict, path: str) -> None:
    """Replace the layers that a quantized checkpoint stores quantized (those with `scales`) by
    empty quantized layers of the stored group size, ready to be filled, and give the weights it
    stores in floating point their storage. The embedding is a QuantEmbedding with its own int8
    rows (`model.embed_tokens.scales`), or reads a tied head's table (no embed_tokens tensor)."""
    mode, _ = mode_of(qcfg)
    cfg, dtype, device = model.config, model.dtype, model.device
    family = families.get(cfg.family)
    layout = {ours: hf for hf, (ours, _) in hf_layout(model).items()}  # ours -> one of its HF names
    embed_hf = family.hf_name("embed.weight")[:-len(".weight")]
    if f"{embed_hf}.scales" in headers:
        scales = headers[f"{embed_hf}.scales"]
        if tuple(scales.shape) != (cfg.vocab_size, 1):
            raise CheckpointError(f"{path}: {embed_hf}.scales has shape {list(scales.shape)}")
        model.embed = QuantEmbedding(cfg.vocab_size, cfg.hidden_size, device=device)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        hf = layout.get(f"{name}.weight") or family.hf_name(f"{name}.weight")  # a tied head: not listed
        scales = headers.get(hf.rsplit(".", 1)[0] + ".scales")
        if scales is None:  # kept in floating point
            continue
        ng = scales.shape[1]
        if ng < 1 or mod.in_features % ng:
            raise CheckpointError(f"{path}: {hf} has scales of shape {list(scales.shape)}")
        q = LAYERS[mode](mod.in_features, mod.out_features, bias=mod.bias is not None,
                         device=device, group_size=mod.in_features // ng)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, q)
    if cfg.tie_embeddings and isinstance(model.lm_head, QuantLinear) and f"{embed_hf}.weight" not in headers:
        model.embed = QuantEmbedding(cfg.vocab_size, cfg.hidden_size, tied_to=model.lm_head)
    made: dict[int, nn.Parameter] = {}
    for mod in model.modules():  # weights kept in floating point; a tied pair gets one storage
        p = mod._parameters.get("weight")
        if p is not None and p.is_meta:
            mod.weight = made.setdefault(id(p), nn.Parameter(empty_storage(p.shape, dtype, device)))
    model.quantization = dict(qcfg)


def _check_size(path: str, cfg: ModelConfig, headers: dict) -> None:
    """Refuse a config.json that promises far more weights than the files hold, before the empty
    model is allocated (an int4 file holds about 0.56 bytes per weight; 0.25 leaves room)."""
    stored = sum(i.nbytes for h in headers.values() for i in h.values())
    if cfg.num_params() > 4 * stored:
        raise CheckpointError(f"{path}: config.json describes {cfg.num_params():,} parameters but the weight files "
                              f"hold only {stored:,} bytes; the config does not belong to these weights")


def load_model(path: str, dtype: torch.dtype | None = None, device=None,
               quantizer: StreamingQuantizer | None = None) -> Transformer:
    """A model from a folder. A folder written by `slm quantize` (config.json carries
    quantization_config) loads quantized as saved; with a quantizer (made once by the caller,
    runtime.lm.load) a floating-point one is quantized while it loads, layer by layer."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such model folder")
    files = weight_files(path)  # first: a pickle-only folder is refused before anything else
    headers = {file: read_header(file) for file in files}
    hf = read_json(os.path.join(path, "config.json"))
    cfg = read_config(path, hf)
    _check_size(path, cfg, headers)

    def tensors():
        for file in files:
            for name, info in headers[file].items():
                yield file, name, info.shape, lambda dst, f=file, i=info: read_into(f, i, dst)

    qcfg = hf.get("quantization_config")
    if not qcfg:
        return load(cfg, tensors(), path, dtype, device, quantizer)
    if quantizer is not None and f"int{qcfg.get('bits')}" != quantizer.mode:
        raise CheckpointError(f"{path}: holds an int{qcfg.get('bits')} model; it cannot be loaded as {quantizer.mode}")
    model = new_empty_model(cfg, dtype, device, lazy_weights=True)
    try:
        _quantized_layers(model, qcfg, {n: i for h in headers.values() for n, i in h.items()}, path)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    with torch.no_grad():
        return fill_model(model, tensors(), path)


def _atomic_dir(path: str):
    """A temporary sibling folder, swapped into place by `_commit` so readers never see half a save."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(os.path.normpath(path)) + "-", dir=parent)


@contextlib.contextmanager
def atomic_folder(path: str):
    """A temporary sibling folder to write path's files into: on success swapped into place
    (`_commit`), on failure removed. Readers never see half a save."""
    tmp = _atomic_dir(path)
    try:
        yield tmp
        _commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_folder(path: str) -> None:
    """Undo a kill inside `_commit`: between its two renames it leaves no `path`, the old folder at
    .tmp-NAME-*.old and the new, complete one beside it; put the new one in place. Other
    .tmp-NAME-* folders are saves cut short: remove them."""
    parent, name = os.path.split(os.path.abspath(path))
    stale = sorted(glob.glob(os.path.join(parent, f".tmp-{name}-*")))
    if not os.path.isdir(path):
        for old in (p for p in stale if p.endswith(".old") and os.path.isdir(p[:-4])):
            os.replace(old[:-4], path)
            break
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)


def _commit(tmp: str, path: str) -> None:
    for name in os.listdir(tmp):  # flush file contents before the rename makes them visible
        if os.path.isfile(os.path.join(tmp, name)):  # (sub-folders were committed by their own save)
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
    if os.path.isdir(path):
        old = tmp + ".old"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _dequantized_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Hugging Face name -> tensor, with each quantized table dequantized to fp32. A quantized head
    tied to the embedding is written once, as the embedding (transformers ties it back)."""
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    tied = model.embed.tied_to if isinstance(model.embed, QuantEmbedding) else None
    weights = {n: m.dequantize() for n, m in model.named_modules()
               if isinstance(m, QuantLinear) or (isinstance(m, QuantEmbedding) and m.tied_to is None)}
    out = {}
    for hf, (ours, rows) in hf_layout(model).items():
        if ours.endswith((".qweight", ".scales", ".mins")):
            if ours.endswith(".qweight"):
                name = ours[:-len(".qweight")]
                w = weights[name]
                if tied is not None and model.get_submodule(name) is tied:
                    hf = families.get(model.config.family).hf_name("embed.qweight")
                out[hf[:-len(".qweight")] + ".weight"] = (w if rows is None else w[rows]).contiguous()
            continue
        out[hf] = (params[ours] if rows is None else params[ours][rows]).detach().to("cpu").contiguous()
    return out


def save_model(model: Transformer, path: str, tokenizer=None, generation_config: dict | None = None,
               max_shard_bytes: int = 2 * 1024**3, dequantize: bool = False) -> None:
    """Write a Hugging Face folder. Shards when the weights exceed max_shard_bytes.

    A quantized model is saved quantized (`qweight`, `scales`, `mins` next to each weight's
    Hugging Face name, and `quantization_config` in config.json), which `load_model` reads back;
    with dequantize=True its weights are written in fp32 instead, for `transformers`."""
    cfg = model.config
    quantized = getattr(model, "quantization", None) and any(hasattr(m, "qweight") for m in model.modules())
    if quantized and model.quantization.get("quant_method") == "gguf":  # only a GGUF file's blocks: fp32
        dequantize = True
    if quantized and not dequantize and any(type(m).__name__ == "GGUFLinear" for m in model.modules()):
        raise CheckpointError(f"{path}: this model holds a GGUF file's own blocks (Q8_0/Q5_0/Q4_K/Q6_K), "
                              "which a quantized slm folder cannot store; save it with dequantize=True, or "
                              "load the file with file_blocks=False to requantize it to slm's int8/int4")
    with atomic_folder(path) as tmp:
        if quantized and dequantize:
            tensors = _dequantized_tensors(model)
        else:
            params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
            tensors = {hf: (params[ours] if rows is None else params[ours][rows]).detach().to("cpu").contiguous()
                       for hf, (ours, rows) in hf_layout(model).items()}
        shards, cur, size = [], {}, 0
        for name, t in tensors.items():
            nb = t.numel() * t.element_size()
            if cur and size + nb > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[name], size = t, size + nb
        shards.append(cur)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in shard})
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        hf = cfg.to_hf()
        hf["dtype"] = _DTYPE_NAMES.get(model.dtype, "float32")
        if quantized and not dequantize:
            hf["quantization_config"] = dict(model.quantization)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
        gen.update(generation_config or {})
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        if tokenizer is not None:
            tokenizer.save(tmp)

