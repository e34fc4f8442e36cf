"""Model configuration: one dataclass for every family, and a registry of named models.

Each registry entry cites the upstream `config.json` it was copied from, so a reader can check
every number. `ModelConfig.from_hf` / `to_hf` translate to and from Hugging Face `config.json`;
what differs between families comes from their records in `families.py`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from . import families
from .families import FAMILIES  # the family names (a live view of families' registry)


class ConfigError(ValueError):
    """A config.json or preset that `slm` cannot turn into a model."""


# Sanity bounds, far above every released model (Llama 3.1 405B: hidden 16,384, MLP 53,248, 126
# layers; Gemma 3: vocabulary 262,144; Llama 4 Scout: 10M context), so that a config.json claiming
# absurd sizes is refused with a message instead of an out-of-memory crash or an endless allocation.
LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 20, "num_layers": 1 << 12,
          "num_heads": 1 << 12, "num_kv_heads": 1 << 12, "head_dim": 1 << 13, "max_seq_len": 1 << 27}
MAX_PARAMS = 10 ** 13


@dataclass
class ModelConfig:
    name: str = "custom"
    family: str = "llama"  # a name in families.FAMILIES: llama (Llama 2, Orca 2, our presets) | mistral | phi | gemma3
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32  # < num_heads: grouped-query attention
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0  # Phi-2 rotates only the first 40% of each head
    norm_eps: float = 1e-5
    sliding_window: int | None = None  # Mistral: each token sees the last `sliding_window` tokens
    layer_types: list[str] | None = None  # Gemma 3: "sliding_attention" | "full_attention" per layer
    rope_local_theta: float | None = None  # Gemma 3: rope base of the sliding-window layers
    rope_scaling_factor: float = 1.0  # linear position scaling of the full-attention layers
    query_pre_attn_scalar: float | None = None  # Gemma 3: attention scale is its -1/2 power
    tie_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # Architecture switches, some fixed by the family (its record's `switches`, see __post_init__).
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + weight), computed in fp32
    qk_norm: bool = False  # Gemma 3: RMSNorm on each query and key head before rope
    sandwich_norm: bool = False  # Gemma 3: norms after attention and MLP too
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(hidden_size)
    mlp: str = "swiglu"  # swiglu | geglu | gelu
    parallel_block: bool = False  # Phi: attention and MLP read the same normed input
    attention_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    source: str = ""  # where the numbers come from

    def __post_init__(self):
        family = families.get(self.family)
        if family is None:
            raise ConfigError(f"unknown model family {self.family!r}; slm supports {', '.join(FAMILIES)}")
        for attr, value in family.switches.items():
            setattr(self, attr, value)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        self.validate()

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def validate(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{f} must be a positive integer, got {v!r}")
            if v > LIMITS[f]:  # checked before anything is allocated from these numbers
                raise ConfigError(f"{f} = {v:,} is beyond any real model (at most {LIMITS[f]:,}): a corrupt or hostile config")
        for f in ("norm_eps", "rope_theta", "partial_rotary_factor", "rope_scaling_factor", "rope_local_theta",
                  "query_pre_attn_scalar"):
            v = getattr(self, f)
            # A zero, negative or NaN epsilon or rope base turns every logit into NaN: refuse it here,
            # at load, instead of generating empty text.
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                                  or v <= 0):
                raise ConfigError(f"{f} must be a positive finite number, got {v!r}")
        if self.partial_rotary_factor > 1:
            raise ConfigError(f"partial_rotary_factor must be at most 1, got {self.partial_rotary_factor}")
        if self.num_params() > MAX_PARAMS:
            raise ConfigError(f"the config describes {self.num_params():,} parameters, more than {MAX_PARAMS:,}: "
                              "a corrupt or hostile config")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.rotary_dim % 2:
            raise ConfigError(f"rotary dim {self.rotary_dim} (head_dim x partial_rotary_factor) must be even")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types lists {len(self.layer_types)} layers, the model has {self.num_layers}")

    def layer_window(self, i: int) -> int | None:
        """The attention window of layer i (None: full causal attention)."""
        if self.layer_types is not None and self.layer_types[i] != "sliding_attention":
            return None
        return self.sliding_window

    def layer_rope(self, i: int) -> tuple[float, float]:
        """(rope base, linear position scale) of layer i: Gemma's local layers use their own base."""
        if self.rope_local_theta is not None and self.layer_window(i) is not None:
            return self.rope_local_theta, 1.0
        return self.rope_theta, self.rope_scaling_factor

    def num_params(self, include_embeddings: bool = True) -> int:
        d, h, kv, hd, f = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.attention_bias:
            attn += h * hd + 2 * kv * hd + d
        n_mats = 2 if self.mlp == "gelu" else 3
        mlp = n_mats * d * f + ((f + d) if self.mlp_bias else 0)
        norms = (1 if self.parallel_block else 4 if self.sandwich_norm else 2) * d * (2 if self.norm == "layernorm" else 1)
        norms += 2 * hd if self.qk_norm else 0
        per_layer = attn + mlp + norms
        final_norm = d * (2 if self.norm == "layernorm" else 1)
        emb = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        head += self.vocab_size if self.lm_head_bias else 0
        total = self.num_layers * per_layer + final_norm + head
        return total + (emb if include_embeddings else 0)

    def kv_cache_bytes(self, seq_len: int | None = None, bytes_per_el: int = 2) -> int:
        """Keys and values of seq_len tokens (default: the full context). A sliding-window layer
        keeps only its window; Gemma 3's full-attention layers keep everything."""
        seq = seq_len or self.max_seq_len
        kept = sum(min(seq, w) if (w := self.layer_window(i)) else seq for i in range(self.num_layers))
        return 2 * kept * self.num_kv_heads * self.head_dim * bytes_per_el

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- Hugging Face config.json ---------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict, name: str = "custom") -> "ModelConfig":
        """The config of a Hugging Face config.json (its contents, a dict); any field of the wrong
        shape ("rope_theta": "abc", "rope_parameters": [1]) is a ConfigError."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config.json must hold a JSON object {{...}}, got {type(hf).__name__}")
        try:
            return cls._from_hf(hf, name)
        except ConfigError:
            raise
        except (TypeError, ValueError, OverflowError, AttributeError) as e:
            raise ConfigError(f"config.json has a field of the wrong type or value ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_hf(cls, hf: dict, name: str) -> "ModelConfig":
        mt = hf.get("model_type")
        family = families.by_model_type(mt) if isinstance(mt, str) else None
        if family is None:
            raise ConfigError(f"unsupported model_type {mt!r}; slm supports {', '.join(families.model_types())}")
        # transformers >= 5 nests rope settings under rope_parameters (per layer type for Gemma 3);
        # older files keep them on top, or under rope_scaling.
        rope = hf.get("rope_parameters") or {}
        local = rope.get("sliding_attention") or {}
        rope = rope.get("full_attention", rope)
        scaling = rope if "rope_type" in rope else (hf.get("rope_scaling") or {})
        rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type not in ("default", "linear"):
            raise ConfigError(f"rope scaling {rope_type!r} is not supported yet")
        try:
            heads = hf["num_attention_heads"]
            kw = dict(
                name=name,
                family=family.name,
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or None,
                max_seq_len=hf.get("max_position_embeddings", 2048),
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                rope_scaling_factor=float(scaling.get("factor", 1.0)) if rope_type == "linear" else 1.0,
                partial_rotary_factor=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
                norm_eps=float(hf.get("rms_norm_eps", hf.get("layer_norm_eps", 1e-5))),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None
        for f in family.hf_fields:
            if f.refuses(hf):
                raise ConfigError(f"{f.key}={hf[f.key]!r} is not supported for model_type {mt!r} "
                                  f"(slm runs {f.key}={f.value!r})")
            if f.attr and hf.get(f.key) is not None:
                kw[f.attr] = f.read(hf[f.key]) if f.read else hf[f.key]
        if local.get("rope_theta") is not None:  # the sliding-window layers' own rope base
            kw["rope_local_theta"] = float(local["rope_theta"])
        if family.hf_read:
            family.hf_read(hf, kw)
        return cls(**kw)

    def to_hf(self) -> dict:
        family = families.get(self.family)
        hf = {
            "architectures": [family.hf_architecture],
            "model_type": family.hf_model_types[0],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "rope_theta": self.rope_theta,  # for readers older than transformers 5
        }
        full = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling_factor != 1.0:
            full.update(rope_type="linear", factor=self.rope_scaling_factor)
            hf["rope_scaling"] = {"rope_type": "linear", "factor": self.rope_scaling_factor}
        if family.carries("partial_rotary_factor"):
            full["partial_rotary_factor"] = self.partial_rotary_factor
        hf["rope_parameters"] = full
        if self.rope_local_theta is not None:  # rope per layer type: the sliding-window layers' own base
            hf["rope_parameters"] = {"full_attention": full, "sliding_attention": {
                "rope_type": "default", "rope_theta": self.rope_local_theta}}
        for f in family.hf_fields:
            value = getattr(self, f.attr) if f.attr else f.value
            hf[f.key] = f.write(value) if f.write else value
        return hf


# -- the registry ------------------------------------------------------------------------------
# Known models: values copied from the upstream config.json named in `source`.
# Presets for training from scratch: shapes chosen by us (stories15M/110M follow llama2.c).
_HF = "https://huggingface.co/{}/blob/main/config.json"

REGISTRY: dict[str, ModelConfig] = {}


def _register(cfg: ModelConfig) -> None:
    REGISTRY[cfg.name] = cfg


_register(ModelConfig(
    name="mistral-7b-v0.1", family="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, max_seq_len=32768, rope_theta=10000.0, norm_eps=1e-5,
    sliding_window=4096, tie_embeddings=False, bos_token_id=1, eos_token_id=2,
    source=_HF.format("mistralai/Mistral-7B-v0.1")))
_register(ModelConfig(
    name="llama-2-7b", family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
    num_layers=32, num_heads=32, num_kv_heads=32, max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5,
    tie_embeddings=False, bos_token_id=1, eos_token_id=2, source=_HF.format("meta-llama/Llama-2-7b-hf")))
_register(ModelConfig(
    name="llama-2-13b", family="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
    num_layers=40, num_heads=40, num_kv_heads=40, max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5,
    tie_embeddings=False, bos_token_id=1, eos_token_id=2, source=_HF.format("meta-llama/Llama-2-13b-hf")))
# Orca 2 is Llama 2 fine-tuned; its tokenizer adds <|im_start|>, <|im_end|> and <pad> (vocab 32003).
_register(ModelConfig(
    name="orca-2-7b", family="llama", vocab_size=32003, hidden_size=4096, intermediate_size=11008,
    num_layers=32, num_heads=32, num_kv_heads=32, max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5,
    tie_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    source=_HF.format("microsoft/Orca-2-7b")))
_register(ModelConfig(
    name="orca-2-13b", family="llama", vocab_size=32003, hidden_size=5120, intermediate_size=13824,
    num_layers=40, num_heads=40, num_kv_heads=40, max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5,
    tie_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    source=_HF.format("microsoft/Orca-2-13b")))
_register(ModelConfig(
    name="phi-2", family="phi", vocab_size=51200, hidden_size=2560, intermediate_size=10240,
    num_layers=32, num_heads=32, num_kv_heads=32, max_seq_len=2048, rope_theta=10000.0,
    partial_rotary_factor=0.4, norm_eps=1e-5, tie_embeddings=False, bos_token_id=50256, eos_token_id=50256,
    source=_HF.format("microsoft/phi-2")))

# Gemma 3 text models: 5 sliding-window layers (local rope base 10k) per full-attention layer (1M).
_GEMMA_TYPES = lambda n: ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]  # noqa: E731
_register(ModelConfig(
    name="gemma-3-270m", family="gemma3", vocab_size=262144, hidden_size=640, intermediate_size=2048,
    num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256, max_seq_len=32768, rope_theta=1_000_000.0,
    rope_local_theta=10_000.0, sliding_window=512, layer_types=_GEMMA_TYPES(18), query_pre_attn_scalar=256,
    norm_eps=1e-6, tie_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    source=_HF.format("google/gemma-3-270m")))
_register(ModelConfig(
    name="gemma-3-1b", family="gemma3", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
    num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256, max_seq_len=32768, rope_theta=1_000_000.0,
    rope_local_theta=10_000.0, sliding_window=512, layer_types=_GEMMA_TYPES(26), query_pre_attn_scalar=256,
    norm_eps=1e-6, tie_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    source=_HF.format("google/gemma-3-1b-pt")))
_register(ModelConfig(
    name="gemma-3-4b", family="gemma3", vocab_size=262208, hidden_size=2560, intermediate_size=10240,
    num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256, max_seq_len=131072, rope_theta=1_000_000.0,
    rope_scaling_factor=8.0, rope_local_theta=10_000.0, sliding_window=1024, layer_types=_GEMMA_TYPES(34),
    query_pre_attn_scalar=256, norm_eps=1e-6, tie_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    source=_HF.format("google/gemma-3-4b-pt") + " (text_config)"))

# Presets for training from scratch (Llama architecture, tied embeddings as llama2.c does).
_register(ModelConfig(
    name="slm-1m", family="llama", vocab_size=2048, hidden_size=128, intermediate_size=352, num_layers=4,
    num_heads=4, num_kv_heads=4, max_seq_len=256, tie_embeddings=True, source="slm preset (~1M parameters)"))
_register(ModelConfig(
    name="stories15m", family="llama", vocab_size=32000, hidden_size=288, intermediate_size=768, num_layers=6,
    num_heads=6, num_kv_heads=6, max_seq_len=256, tie_embeddings=True,
    source="llama2.c stories15M: dim 288, n_layers 6, n_heads 6, hidden 768, seq 256"))
_register(ModelConfig(
    name="slm-50m", family="llama", vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=10,
    num_heads=8, num_kv_heads=8, max_seq_len=512, tie_embeddings=True, source="slm preset (~50M parameters)"))
_register(ModelConfig(
    name="stories110m", family="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
    num_layers=12, num_heads=12, num_kv_heads=12, max_seq_len=1024, tie_embeddings=True,
    source="llama2.c stories110M: dim 768, n_layers 12, n_heads 12, hidden 2048, seq 1024"))
_register(ModelConfig(
    name="slm-124m", family="llama", vocab_size=50304, hidden_size=768, intermediate_size=2048, num_layers=12,
    num_heads=12, num_kv_heads=12, max_seq_len=1024, tie_embeddings=True,
    source="slm preset: the GPT-2 small shape (124M) with a Llama block"))


def get_config(name: str) -> ModelConfig:
    if name not in REGISTRY:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name].replace()


def memory_table(cfg: ModelConfig) -> dict[str, int]:
    """Bytes of weights at each storage precision: int8 with one fp32 scale per output row,
    int4 with one bf16 scale and zero point per group of 32 weights."""
    n = cfg.num_params()
    return {"fp32": n * 4, "bf16": n * 2, "int8": n + 4 * n // cfg.hidden_size, "int4": math.ceil(n / 2 + n / 32 * 4)}
