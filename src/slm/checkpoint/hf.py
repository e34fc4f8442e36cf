"""Hugging Face model folders: config.json + (sharded) safetensors + tokenizer files.

`load_model` streams tensors shard by shard into a model allocated once in the target dtype, so
peak memory stays near the model's own size. `save_model` writes the same layout that
`transformers.AutoModelForCausalLM.from_pretrained` reads, atomically.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..model.config import ConfigError, ModelConfig
from ..model import Transformer
from .safetensors_io import CheckpointError, read_header, read_into

# Our parameter names -> Hugging Face names, per family (first matching pattern wins).
_COMMON = [
    (r"^embed\.", "model.embed_tokens."),
    (r"^blocks\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^lm_head\.", "lm_head."),
]
_NAMES = {
    "llama": _COMMON + [
        (r"^blocks\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
        (r"^blocks\.(\d+)\.mlp_norm\.", r"model.layers.\1.post_attention_layernorm."),
        (r"^blocks\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
        (r"^norm\.", "model.norm."),
    ],
    "phi": _COMMON + [
        (r"^blocks\.(\d+)\.attn\.o_proj\.", r"model.layers.\1.self_attn.dense."),
        (r"^blocks\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
        (r"^blocks\.(\d+)\.mlp\.up_proj\.", r"model.layers.\1.mlp.fc1."),
        (r"^blocks\.(\d+)\.mlp\.down_proj\.", r"model.layers.\1.mlp.fc2."),
        (r"^norm\.", "model.final_layernorm."),
    ],
}
_NAMES["mistral"] = _NAMES["llama"]
_NAMES["gemma3"] = _COMMON + [
    (r"^blocks\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"^blocks\.(\d+)\.post_attn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^blocks\.(\d+)\.mlp_norm\.", r"model.layers.\1.pre_feedforward_layernorm."),
    (r"^blocks\.(\d+)\.post_mlp_norm\.", r"model.layers.\1.post_feedforward_layernorm."),
    (r"^blocks\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
    (r"^norm\.", "model.norm."),
]
# Tensors some checkpoints carry that hold no weights (old Llama exports saved the rope table).
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def hf_name(family: str, ours: str) -> str:
    for pat, rep in _NAMES[family]:
        if re.match(pat, ours):
            return re.sub(pat, rep, ours)
    raise KeyError(ours)


_FUSED = re.compile(r"^(blocks\.\d+\.(?:attn|mlp))\.(qkv_proj|gate_up_proj)\.(weight|bias|qweight|scales|mins)$")


def hf_layout(model: Transformer) -> dict[str, tuple[str, slice | None]]:
    """Each Hugging Face tensor name -> (our parameter, the rows of it that tensor fills).
    Our fused QKV and gate/up matrices are the checkpoints' separate matrices stacked by rows; so
    are the buffers of a quantized layer (`qweight`, `scales`, `mins`: one row per output)."""
    cfg, out = model.config, {}
    q, kv, _ = model.blocks[0].attn.split
    f = cfg.intermediate_size
    parts = {"qkv_proj": [("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)), ("v_proj", slice(q + kv, q + 2 * kv))],
             "gate_up_proj": [("gate_proj", slice(0, f)), ("up_proj", slice(f, 2 * f))]}
    # a tied LM head is listed once, as the embedding (a quantized one by its buffers)
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        m = _FUSED.match(name)
        if m:
            for part, rows in parts[m[2]]:
                out[hf_name(cfg.family, f"{m[1]}.{part}.{m[3]}")] = (name, rows)
        else:
            out[hf_name(cfg.family, name)] = (name, None)
    return out


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_config(path: str) -> ModelConfig:
    """ModelConfig from a model folder's config.json."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such model folder")
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


def default_dtype(device: torch.device) -> torch.dtype:
    # This CPU has no native bf16: fp32 is both faster and exact. GPUs get bf16.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@contextlib.contextmanager
def _meta_device():
    """Build modules on the meta device without nn.Embedding's random init: on meta it runs a Python
    decomposition that imports torch._dynamo (80 MB, 2 s) for values about to be overwritten."""
    saved = nn.Embedding.reset_parameters
    nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            yield
    finally:
        nn.Embedding.reset_parameters = saved


def _materialize(model: nn.Module, dtype: torch.dtype, device: torch.device, lazy_weights: bool = False) -> None:
    """Give each meta parameter real, uninitialised storage (tied parameters stay tied). Unlike
    Module.to_empty this calls torch.empty directly: empty_like on meta imports torch.fx (50 MB).
    lazy_weights: leave the weights of linear layers and embeddings on meta, for a quantizer to
    fill layer by layer."""
    made: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                if lazy_weights and isinstance(mod, (nn.Linear, nn.Embedding)) and name == "weight":
                    continue
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(_empty(p.shape, dtype, device), p.requires_grad)
                mod._parameters[name] = made[id(p)]


def _empty(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Storage for a parameter. The LM head (a matrix far taller than wide) is stored column-major:
    at batch 1, MKL's matrix-vector product streams [in, out] 2-3x faster than [out, in]
    (benchmarks/decode.py). The other matrices stay row-major for slm's own one-row kernel
    (model.Linear). Shape and values are unchanged; only the memory order differs."""
    if device.type == "cpu" and len(shape) == 2 and shape[0] >= 16 * shape[1]:
        return torch.empty(shape[1], shape[0], dtype=dtype, device=device).t()
    return torch.empty(shape, dtype=dtype, device=device)


def new_empty_model(cfg: ModelConfig, dtype: torch.dtype | None = None, device=None,
                    lazy_weights: bool = False) -> Transformer:
    """A model whose parameters are allocated but not initialised, ready to be filled."""
    device = torch.device(device or "cpu")
    with _meta_device():
        model = Transformer(cfg)
    _materialize(model, dtype or default_dtype(device), device, lazy_weights)
    return model


def _quantized_layers(model: Transformer, qcfg: dict, headers: dict, path: str) -> None:
    """Replace the layers that a quantized checkpoint stores quantized (those with `scales`) by
    empty quantized layers of the stored group size, ready to be filled, and give the weights it
    stores in floating point their storage. The embedding is a QuantEmbedding with its own int8
    rows (`model.embed_tokens.scales`), or reads a tied head's table (no embed_tokens tensor)."""
    from ..quant.apply import mode_of
    from ..quant.layers import LAYERS, QuantEmbedding, QuantLinear
    mode, _ = mode_of(qcfg)
    cfg, dtype, device = model.config, model.dtype, model.device
    layout = {ours: hf for hf, (ours, _) in hf_layout(model).items()}  # ours -> one of its HF names
    embed_hf = hf_name(cfg.family, "embed.weight")[:-len(".weight")]
    if f"{embed_hf}.scales" in headers:
        scales = headers[f"{embed_hf}.scales"]
        if tuple(scales.shape) != (cfg.vocab_size, 1):
            raise CheckpointError(f"{path}: {embed_hf}.scales has shape {list(scales.shape)}")
        model.embed = QuantEmbedding(cfg.vocab_size, cfg.hidden_size, device=device)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        hf = layout.get(f"{name}.weight") or hf_name(cfg.family, f"{name}.weight")  # a tied head: not listed
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
            mod.weight = made.setdefault(id(p), nn.Parameter(_empty(p.shape, dtype, device)))
    model.quantization = dict(qcfg)


def fill_model(model: Transformer, tensors, source: str, config_name: str = "config.json",
               quantizer=None) -> Transformer:
    """Fill every parameter from `tensors`: (file, Hugging Face name, shape, src) items, where src
    is write(dst) or a tensor to copy. Each tensor is written into its place as it comes, so
    nothing larger than one tensor is held.
    quantizer (quantize.StreamingQuantizer): weights left on meta get storage from it (a whole
    fp32 src tensor is taken as it is, not copied: it is about to be quantized), and each layer
    (and the embedding) is quantized as soon as all its rows are written. An item may carry a
    fifth element, a GGUF tensor's blocks (ggml type, uint8 [rows, bytes]), which the quantizer
    may keep as they are (quantize_gguf.GGUFLinear) instead of quantizing the fp32 rows."""
    cfg = model.config
    params, layout = {**dict(model.named_parameters()), **dict(model.named_buffers())}, hf_layout(model)
    seen: set[str] = set()
    for item in tensors:
        file, name, shape, src = item[:4]
        if _IGNORED.search(name) or (cfg.tie_embeddings and name == "lm_head.weight"):
            continue
        if name not in layout:
            raise CheckpointError(f"{file}: unexpected tensor {name!r} for a {cfg.family} model")
        ours, rows = layout[name]
        dst = params[ours]
        if quantizer is not None and dst.is_meta:
            dst = quantizer.storage(ours, src if rows is None and isinstance(src, torch.Tensor) else None)
        dst = dst if rows is None else dst[rows]
        if tuple(dst.shape) != tuple(shape):
            raise CheckpointError(f"{file}: tensor {name!r} has shape {list(shape)} but {config_name} "
                                  f"implies {list(dst.shape)}")
        if not isinstance(src, torch.Tensor):
            src(dst.data)
        elif dst.data_ptr() != src.data_ptr():
            dst.data.copy_(src)
        seen.add(name)
        if quantizer is not None:
            if len(item) > 4 and item[4] is not None:
                quantizer.blocks(ours, 0 if rows is None else rows.start, *item[4])
            quantizer.written(ours, dst.shape[0])
    missing = sorted(set(layout) - seen)
    if missing:
        raise CheckpointError(f"{source}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]!r}")
    if quantizer is not None:
        quantizer.finish()
    return model.eval()


def _check_size(path: str, cfg: ModelConfig, headers: dict) -> None:
    """Refuse a config.json that promises far more weights than the files hold, before the empty
    model is allocated (an int4 file holds about 0.56 bytes per weight; 0.25 leaves room)."""
    stored = sum(i.nbytes for h in headers.values() for i in h.values())
    if cfg.num_params() > 4 * stored:
        raise CheckpointError(f"{path}: config.json describes {cfg.num_params():,} parameters but the weight files "
                              f"hold only {stored:,} bytes; the config does not belong to these weights")


def load_model(path: str, dtype: torch.dtype | None = None, device=None, quantize: str | None = None,
               group_size: int | None = None) -> Transformer:
    """A model from a folder. A folder written by `slm quantize` (config.json carries
    quantization_config) loads quantized as saved; quantize="int8"|"int4" quantizes a floating-point
    one while it loads, layer by layer."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such model folder")
    files = weight_files(path)  # first: a pickle-only folder is refused before anything else
    headers = {file: read_header(file) for file in files}
    qcfg = read_json(os.path.join(path, "config.json")).get("quantization_config")
    _check_size(path, read_config(path), headers)
    quantizer = None
    if qcfg:
        if quantize and f"int{qcfg.get('bits')}" != quantize:
            raise CheckpointError(f"{path}: holds an int{qcfg.get('bits')} model; it cannot be loaded as {quantize}")
        model = new_empty_model(read_config(path), dtype, device, lazy_weights=True)
        try:
            _quantized_layers(model, qcfg, {n: i for h in headers.values() for n, i in h.items()}, path)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    else:
        model = new_empty_model(read_config(path), dtype, device, lazy_weights=bool(quantize))
        if quantize:
            from ..quant.apply import StreamingQuantizer
            quantizer = StreamingQuantizer(model, quantize, group_size)

    def tensors():
        for file in files:
            for name, info in headers[file].items():
                yield file, name, info.shape, lambda dst, f=file, i=info: read_into(f, i, dst)
    return fill_model(model, tensors(), path, quantizer=quantizer)


def _atomic_dir(path: str):
    """A temporary sibling folder, swapped into place by `_commit` so readers never see half a save."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(os.path.normpath(path)) + "-", dir=parent)


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
    from ..quant.layers import QuantEmbedding, QuantLinear
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
                    hf = hf_name(model.config.family, "embed.qweight")
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
    if quantized and not dequantize and any(type(m).__name__ == "GGUFLinear" for m in model.modules()):
        raise CheckpointError(f"{path}: this model holds a GGUF file's own blocks (Q8_0/Q5_0/Q4_K/Q6_K), "
                              "which a quantized slm folder cannot store; save it with dequantize=True, or "
                              "load the file with file_blocks=False to requantize it to slm's int8/int4")
    tmp = _atomic_dir(path)
    try:
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
        _commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
