"""slm quantize, export, lora merge: writing a model in another form."""

from __future__ import annotations

from .flags import MODEL_HELP, at_least


def overwrite_flag(p) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")


def check_out(a, kind: str, sources: tuple[str, ...] = ("model",)) -> None:
    """Refuse, before loading anything, an --out that would destroy an input or, without
    --overwrite, anything already there; and an --out of the wrong kind (a file where a folder
    goes, or the reverse)."""
    import os

    from ..files import output_file, output_folder, same_path
    for name in sources:
        src = getattr(a, name)
        if src and os.path.exists(src) and same_path(a.out, src):
            raise ValueError(f"--out {a.out} is (or holds, or lies inside) --{name} {src}: writing there would "
                             "destroy it; choose another --out")
    (output_folder if kind == "folder" else output_file)(a.out)
    there = os.path.isfile(a.out) or (os.path.isdir(a.out) and os.listdir(a.out))
    if there and not a.overwrite:
        raise ValueError(f"--out {a.out} already exists; pass --overwrite to replace it")


def quantize_flags(p) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--bits", type=int, choices=[8, 4], required=True,
                   help="int8 (one scale per output channel) or int4")
    p.add_argument("--group-size", type=at_least(1), default=None,
                   help="weights per scale (default: int8 per channel, int4 32)")
    p.add_argument("--out", required=True, help="folder for the quantized copy (slm.load reads it)")
    overwrite_flag(p)


def quantize(a) -> None:
    from .. import load
    check_out(a, "folder")
    # file_blocks=False: a GGUF file's blocks cannot be stored in slm's int8/int4 folder; requantize
    lm = load(a.model, quantize=f"int{a.bits}", group_size=a.group_size, file_blocks=False)
    lm.save(a.out)
    print(f"wrote {a.out}: int{a.bits}, {lm.model.quantization}")


def export_flags(p) -> None:
    p.add_argument("--model", required=True, help="model folder (quantized or not) or .gguf file")
    p.add_argument("--format", choices=["gguf", "hf"], required=True,
                   help="gguf: one file for llama.cpp and Ollama; hf: a Hugging Face folder (dequantized)")
    p.add_argument("--out", required=True, help="FILE.gguf, or a folder for --format hf")
    p.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f32", help="GGUF tensor type of the matrices")
    overwrite_flag(p)


def export(a) -> None:
    from .. import load
    check_out(a, "file" if a.format == "gguf" else "folder")
    lm = load(a.model)
    if a.format == "gguf":
        import os

        from ..checkpoint.gguf_write import write_gguf
        from ..runtime.models import resolve
        path = resolve(a.model)[0]  # a GGUF source's tokenizer metadata is written unchanged
        write_gguf(lm, a.out, a.dtype, source=path if os.path.isfile(path) else None)
    else:
        lm.save(a.out, dequantize=True)
    print(f"wrote {a.out}")


def lora_merge_flags(p) -> None:
    p.add_argument("--model", required=True, help="the base model folder or .gguf file")
    p.add_argument("--adapter", required=True, help="folder with adapter_model.safetensors + adapter_config.json")
    p.add_argument("--out", required=True, help="folder for the merged Hugging Face model")
    overwrite_flag(p)


def lora_merge(a) -> None:
    from .. import load
    check_out(a, "folder", sources=("model", "adapter"))
    from ..finetune.lora import load_adapter, merge_lora
    lm = load(a.model, dtype="fp32")
    load_adapter(lm.model, a.adapter)
    merge_lora(lm.model)
    lm.save(a.out, dequantize=bool(getattr(lm.model, "quantization", None)))
    print(f"wrote {a.out}: {a.model} with {a.adapter} merged in")
