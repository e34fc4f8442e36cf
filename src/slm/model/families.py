"""The model families: one record each, the one place where a family differs from another.

A `Family` says everything about a family that is not a size: its Hugging Face `model_type` and
architecture class, the architecture switches it sets on `ModelConfig` (the transformer reads only
those), its config.json fields, its tensor names in Hugging Face checkpoints and in GGUF files,
and llama.cpp's conventions for it. The code that reads and writes checkpoints has no family in
it; it reads these records:

    ModelConfig.__post_init__      switches
    ModelConfig.from_hf / to_hf    hf_model_types, hf_architecture, hf_fields, hf_read
    checkpoint/loader.py, hf.py    hf_names
    checkpoint/gguf.py             gguf_arch, gguf_marker, gguf_names, gguf_permute_qk,
                                   gguf_norm_plus_one, gguf_read, gguf_ranks_by_order
    checkpoint/gguf_write.py       gguf_arch, gguf_names, gguf_permute_qk, gguf_norm_plus_one,
                                   gguf_export

Adding a family is adding a record with `register` (docs/adding-a-family.md walks through one);
only an architecture the transformer cannot yet express also needs a new switch in the model.

Tensor names are dotted module paths in which `N` stands for a layer number: `hf_names` maps our
module paths to Hugging Face's (the longest matching prefix wins: `blocks.N.attn.o_proj` before
`blocks.N.attn`), `gguf_names` maps Hugging Face module paths to llama.cpp's, one to one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class HFField:
    """One family-specific entry of config.json, written in the order the family lists them.

    With `attr`, the entry carries that ModelConfig attribute: read (through `read`, when the file
    holds a value) and written (through `write`). Without, it is a constant written as `value`;
    with `check`, a config.json holding another value is refused (a feature slm does not run)."""

    key: str
    attr: str | None = None
    value: Any = None
    check: bool = False
    read: Callable[[Any], Any] | None = None
    write: Callable[[Any], Any] | None = None

    def refuses(self, hf: dict) -> bool:
        """Whether config.json `hf` asks for what this constant says slm does not do (a false
        value, null or 0, stands for "off" alike)."""
        if not self.check or self.key not in hf:
            return False
        got = hf[self.key]
        return got != self.value if self.value else bool(got)


def carry(key: str, attr: str, read: Callable[[Any], Any] | None = None,
          write: Callable[[Any], Any] | None = None) -> HFField:
    """A config.json entry that carries ModelConfig.`attr`."""
    return HFField(key, attr, read=read, write=write)


def const(key: str, value: Any, check: bool = True) -> HFField:
    """A config.json entry always written as `value`; with check, a file with another is refused."""
    return HFField(key, value=value, check=check)


@dataclass(frozen=True, eq=False)
class Family:
    name: str  # ModelConfig.family
    title: str  # for messages: "Llama", "Gemma 3"
    hf_model_types: tuple[str, ...]  # config.json model_type values read as this family; the first is written
    hf_architecture: str  # config.json "architectures": the transformers class
    hf_names: Mapping[str, str]  # our module path -> Hugging Face's
    hf_fields: tuple[HFField, ...]  # config.json entries of this family alone, its activation among them
    switches: Mapping[str, Any] = field(default_factory=dict)  # ModelConfig attributes the family fixes
    # llama.cpp: the architecture name (None: no GGUF), the tensor names, and its conventions
    gguf_arch: str | None = None
    gguf_names: Mapping[str, str] = field(default_factory=dict)  # Hugging Face module path -> GGUF's
    gguf_marker: str | None = None  # families sharing a gguf_arch: this one when `{arch}.{marker}` is set
    gguf_permute_qk: bool = False  # Q/K rows interleaved for llama.cpp's rotary pairs (LlamaModel.permute)
    gguf_norm_plus_one: bool = False  # RMSNorm weights stored as the scale 1 + w
    gguf_ranks_by_order: bool = False  # a SentencePiece vocabulary's merges rank by token order, not score
    gguf_export: bool = True  # whether slm writes this family as GGUF
    # What the tables above cannot say: functions that complete ModelConfig's keyword arguments
    hf_read: Callable[[dict, dict], None] | None = None  # (config.json, kwargs)
    gguf_read: Callable[[Callable[..., Any], dict], None] | None = None  # (metadata getter, kwargs)

    def __post_init__(self):  # read-only views: a registered record cannot change under its users
        for name in ("hf_names", "switches", "gguf_names"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        object.__setattr__(self, "_from_gguf", MappingProxyType({v: k for k, v in self.gguf_names.items()}))

    @property
    def hf_act(self) -> str | None:
        """The activation config.json names (hidden_act, or Gemma's hidden_activation)."""
        return next((f.value for f in self.hf_fields if f.key in ("hidden_act", "hidden_activation")), None)

    def carries(self, attr: str) -> bool:
        """Whether config.json carries ModelConfig.`attr` for this family."""
        return any(f.attr == attr for f in self.hf_fields)

    # -- names ---------------------------------------------------------------------------------
    def hf_name(self, ours: str) -> str:
        """Our parameter name -> the Hugging Face tensor name (blocks.3.mlp.down_proj.weight ->
        model.layers.3.mlp.down_proj.weight). KeyError if the family has none."""
        hf = _rename(self.hf_names, ours, prefix=True)
        if hf is None:
            raise KeyError(ours)
        return hf

    def gguf_name(self, hf: str) -> str | None:
        """A Hugging Face tensor name -> llama.cpp's (model.layers.3.mlp.up_proj.bias ->
        blk.3.ffn_up.bias), or None."""
        return _rename(self.gguf_names, hf)

    def hf_from_gguf(self, name: str) -> str | None:
        """A GGUF tensor name -> the Hugging Face name, or None."""
        return _rename(self._from_gguf, name)


def _rename(table: Mapping[str, str], name: str, prefix: bool = False) -> str | None:
    """`name` with its module path translated by `table` (N: the layer number), keeping the
    tensor's own last part (weight, bias, ...). prefix: the longest listed module path that begins
    the name counts, not just the whole path."""
    parts = name.split(".")
    if "N" in parts:  # only a layer number stands for N
        return None
    layer = next((p for p in parts if p.isdigit()), None)
    generic = ["N" if p.isdigit() else p for p in parts]
    for k in range(len(parts) - 1, 0 if prefix else len(parts) - 2, -1):
        hit = table.get(".".join(generic[:k]))
        if hit is not None:
            return ".".join([layer if p == "N" else p for p in hit.split(".")] + parts[k:])
    return None


def layer_names(names: Mapping[str, str], src: str = "blocks.N", dst: str = "model.layers.N") -> dict[str, str]:
    """{path: path} within one layer -> the paths from the model's top (by default ours -> Hugging
    Face's: attn_norm -> blocks.N.attn_norm: model.layers.N.input_layernorm)."""
    return {f"{src}.{k}": f"{dst}.{v}" for k, v in names.items()}


# -- the registry --------------------------------------------------------------------------------
_REGISTRY: dict[str, Family] = {}
# The family names, in registration order: a live view of the registry.
FAMILIES = _REGISTRY.keys()


def register(family: Family) -> Family:
    """Add a family; its names must be new. Returns it."""
    if family.name in _REGISTRY:
        raise ValueError(f"a family {family.name!r} is registered already")
    taken = {t for f in _REGISTRY.values() for t in f.hf_model_types}
    clash = [t for t in family.hf_model_types if t in taken]
    if clash:
        raise ValueError(f"model_type {clash[0]!r} belongs to another family already")
    if family.gguf_arch and any(f.gguf_arch == family.gguf_arch and f.gguf_marker == family.gguf_marker
                                for f in _REGISTRY.values()):
        raise ValueError(f"GGUF architecture {family.gguf_arch!r} (marker {family.gguf_marker!r}) "
                         "belongs to another family already")
    if len(set(family.gguf_names.values())) != len(family.gguf_names):
        raise ValueError(f"{family.name}: two Hugging Face tensors share a GGUF name")
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a family added by `register` (a test's made-up family)."""
    _REGISTRY.pop(name)


def get(name: str) -> Family | None:
    return _REGISTRY.get(name)


def all_families() -> Iterator[Family]:
    return iter(list(_REGISTRY.values()))


def by_model_type(model_type: str) -> Family | None:
    """The family config.json's model_type names."""
    return next((f for f in _REGISTRY.values() if model_type in f.hf_model_types), None)


def model_types() -> list[str]:
    return [t for f in _REGISTRY.values() for t in f.hf_model_types]


def by_gguf_arch(arch: str, has: Callable[[str], bool]) -> Family | None:
    """The family of a GGUF file: among those of its architecture, the first whose marker the
    file's metadata holds (`has(key)`), else the one without a marker."""
    candidates = [f for f in _REGISTRY.values() if f.gguf_arch == arch]
    marked = [f for f in candidates if f.gguf_marker and has(f.gguf_marker)]
    return (marked or [f for f in candidates if not f.gguf_marker] or [None])[0]


def gguf_archs() -> list[str]:
    return list(dict.fromkeys(f.gguf_arch for f in _REGISTRY.values() if f.gguf_arch))


# -- the families --------------------------------------------------------------------------------
_TOP = {"embed": "model.embed_tokens", "lm_head": "lm_head", "norm": "model.norm"}
LLAMA_HF_NAMES = {**_TOP, **layer_names({
    "attn_norm": "input_layernorm", "attn": "self_attn", "mlp_norm": "post_attention_layernorm", "mlp": "mlp"})}
_GGUF_TOP = {"model.embed_tokens": "token_embd", "lm_head": "output", "model.norm": "output_norm"}
_GGUF_ATTN_MLP = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
LLAMA_GGUF_NAMES = {**_GGUF_TOP, **layer_names({
    "input_layernorm": "attn_norm", **_GGUF_ATTN_MLP, "post_attention_layernorm": "ffn_norm"},
    "model.layers.N", "blk.N")}
# The config.json entries Llama's and Gemma's configs share, ahead of their own.
_RMS_FIELDS = (carry("rms_norm_eps", "norm_eps", float), carry("head_dim", "head_dim"),
               carry("attention_bias", "attention_bias", bool))
LLAMA_HF_FIELDS = (*_RMS_FIELDS, const("hidden_act", "silu"), carry("mlp_bias", "mlp_bias", bool))

register(Family(
    name="llama", title="Llama", hf_model_types=("llama",), hf_architecture="LlamaForCausalLM",
    hf_names=LLAMA_HF_NAMES, hf_fields=LLAMA_HF_FIELDS,
    gguf_arch="llama", gguf_names=LLAMA_GGUF_NAMES, gguf_permute_qk=True))

# Mistral: Llama with a sliding window. llama.cpp writes it as `llama` with attention.sliding_window.
register(Family(
    name="mistral", title="Mistral", hf_model_types=("mistral",), hf_architecture="MistralForCausalLM",
    hf_names=LLAMA_HF_NAMES, hf_fields=(*LLAMA_HF_FIELDS, carry("sliding_window", "sliding_window")),
    gguf_arch="llama", gguf_marker="attention.sliding_window", gguf_names=LLAMA_GGUF_NAMES, gguf_permute_qk=True))

# Phi-2: LayerNorm, one norm feeding attention and a plain GELU MLP side by side, biases everywhere,
# rotary embedding on the first 40% of each head.
register(Family(
    name="phi", title="Phi", hf_model_types=("phi",), hf_architecture="PhiForCausalLM",
    hf_names={**_TOP, "norm": "model.final_layernorm", **layer_names({
        "attn_norm": "input_layernorm", "attn": "self_attn", "attn.o_proj": "self_attn.dense",
        "mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"})},
    hf_fields=(const("hidden_act", "gelu_new"), carry("layer_norm_eps", "norm_eps", float),
               const("qk_layernorm", False), carry("partial_rotary_factor", "partial_rotary_factor", float),
               const("resid_pdrop", 0.0, check=False), const("embd_pdrop", 0.0, check=False)),
    switches=dict(norm="layernorm", mlp="gelu", parallel_block=True, attention_bias=True, mlp_bias=True,
                  lm_head_bias=True),
    gguf_arch="phi2",
    gguf_names={"model.embed_tokens": "token_embd", "lm_head": "output", "model.final_layernorm": "output_norm",
                **layer_names({"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                               "self_attn.dense": "attn_output", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"},
                              "model.layers.N", "blk.N")}))


def _int_if_whole(x):
    return int(x) if x is not None and float(x).is_integer() else x  # transformers' strict configs want ints


def _gemma3_layer_types(n: int, pattern: int | list) -> list[str]:
    """Every `pattern`-th layer attends globally, the others through the sliding window (or, a
    list: one flag per layer, true = sliding window)."""
    if isinstance(pattern, list):
        return ["sliding_attention" if swa else "full_attention" for swa in pattern]
    return ["full_attention" if pattern and (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]


def _gemma3_hf_read(hf: dict, kw: dict) -> None:
    """Gemma 3's defaults for what its config.json may leave out (older files: a layer pattern)."""
    if "tie_word_embeddings" not in hf:
        kw["tie_embeddings"] = True
    if not kw.get("layer_types"):
        kw["layer_types"] = _gemma3_layer_types(
            kw["num_layers"], hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
    if kw.get("rope_local_theta") is None:
        kw["rope_local_theta"] = 10000.0
    if kw.get("query_pre_attn_scalar") is None:
        kw["query_pre_attn_scalar"] = float(kw.get("head_dim") or 256)


def _gemma3_gguf_read(m, kw: dict) -> None:
    """What llama.cpp's Gemma 3 metadata leaves implicit: every 6th layer global, the local rope
    base 10k, the attention scale head_dim^-1/2."""
    kw["layer_types"] = _gemma3_layer_types(kw["num_layers"], m("attention.sliding_window_pattern", 6))
    kw["query_pre_attn_scalar"] = float(kw.get("head_dim") or kw["hidden_size"] // kw["num_heads"])
    kw["rope_local_theta"] = 10000.0
    kw.setdefault("rope_theta", 1_000_000.0)


# Gemma 3 (text): RMSNorm scaling by 1 + w, norms around both branches and on each query and key
# head, GeGLU, embeddings scaled by sqrt(hidden), local sliding-window layers between global ones.
register(Family(
    name="gemma3", title="Gemma 3", hf_model_types=("gemma3_text",), hf_architecture="Gemma3ForCausalLM",
    hf_names={**_TOP, **layer_names({
        "attn_norm": "input_layernorm", "attn": "self_attn", "post_attn_norm": "post_attention_layernorm",
        "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm", "mlp": "mlp"})},
    hf_fields=(*_RMS_FIELDS, const("hidden_activation", "gelu_pytorch_tanh"), carry("sliding_window", "sliding_window"),
               carry("layer_types", "layer_types"),
               carry("query_pre_attn_scalar", "query_pre_attn_scalar", float, _int_if_whole),
               carry("rope_local_base_freq", "rope_local_theta", float), const("final_logit_softcapping", None),
               const("attn_logit_softcapping", None), const("use_bidirectional_attention", False)),
    switches=dict(norm_plus_one=True, qk_norm=True, sandwich_norm=True, embed_scale=True, mlp="geglu"),
    hf_read=_gemma3_hf_read,
    gguf_arch="gemma3",
    gguf_names={**_GGUF_TOP, **layer_names({
        "input_layernorm": "attn_norm", **_GGUF_ATTN_MLP, "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"},
        "model.layers.N", "blk.N")},
    gguf_norm_plus_one=True, gguf_ranks_by_order=True, gguf_export=False, gguf_read=_gemma3_gguf_read))
