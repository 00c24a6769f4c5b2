"""GLMConfig: the shape and regularisation of one GLM, with presets for every released size (spec §6.1, §8.4).

    python -c "from model.config import PRESETS; [print(n, f'{c.num_params/1e6:.1f}M') for n, c in PRESETS.items()]"

The hub `config.json` of the released checkpoints uses other field names (spec §8.4); `GLMConfig.from_hub` and
`GLMConfig.to_hub` translate. Derived figures (head_dim, ffn_dim, table sizes, parameter count) are properties,
never configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTN_IMPLS = ("sdpa", "flex")


@dataclass(frozen=True)
class GLMConfig:
    n_layer: int                          # transformer blocks (L)
    d_model: int                          # hidden size h; head_dim = d_model // n_head (64 in every release)
    n_head: int                           # attention heads
    vocab_size: int                       # rows of the word embedding (= tied output size); from the tokenizer
    max_position_embeddings: int = 512    # P: longest context; tables get P+1 rows with 2D positions (§6.1)
    block_position_encoding: bool = True  # 2D positions: add the intra-span block-position table (§1, §6.2)
    embedding_dropout: float = 0.1        # after word + position (+ block) embeddings; 0.1 in every release
    attention_dropout: float = 0.1        # on the attention probabilities; ignored by the flex path (warns)
    hidden_dropout: float = 0.1           # on the attention-output and MLP-output projections before the residual
    layernorm_eps: float = 1e-5           # LayerNorm epsilon (apex FusedLayerNorm default, §6.1)
    init_std: float = 0.02                # N(0, init_std) init; output projections use init_std/sqrt(2L) (§6.4)
    attn_impl: str = "sdpa"               # "sdpa": torch SDPA with a boolean mask (any device); "flex": CUDA
                                          # FlexAttention block mask from sep, never builds a [B,1,T,T] mask

    def __post_init__(self):
        for name in ("n_layer", "d_model", "n_head", "vocab_size", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"GLMConfig.{name}={getattr(self, name)!r} must be a positive integer")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                             "choose n_head so that head_dim = d_model // n_head is an integer (64 in releases)")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r}: choose one of {ATTN_IMPLS}")
        for name in ("embedding_dropout", "attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"GLMConfig.{name}={getattr(self, name)!r} must be in [0, 1)")

    # ---- derived figures ------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        return 4 * self.d_model  # always 4h: the official --intermediate-size is ignored (spec §14.19)

    @property
    def position_table_rows(self) -> int:
        # P+1 rows with 2D positions (the extra row is the sentinel ablation's constant id, §14.12), P without (§6.1)
        return self.max_position_embeddings + (1 if self.block_position_encoding else 0)

    @property
    def num_params(self) -> int:
        """Parameter count from the shapes of spec §8.3 (tied output: no LM head)."""
        h, L = self.d_model, self.n_layer
        per_layer = (2 * h) + (3 * h * h + 3 * h) + (h * h + h) + (2 * h) + (4 * h * h + 4 * h) + (4 * h * h + h)
        tables = self.position_table_rows * h * (2 if self.block_position_encoding else 1)
        return self.vocab_size * h + tables + L * per_layer + 2 * h

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (6N for the matmul weights + attention scores), a PaLM-style estimate."""
        n_matmul = self.n_layer * 12 * self.d_model ** 2 + self.vocab_size * self.d_model
        return 6 * n_matmul + 12 * self.n_layer * self.d_model * seq_len

    # ---- hub config.json ------------------------------------------------------------------------------------
    @classmethod
    def from_hub(cls, hub: dict[str, Any], **overrides: Any) -> GLMConfig:
        """Build from a hub `config.json` dict (num_layers, hidden_size, …; spec §8.4). Unknown keys are ignored."""
        missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size") if k not in hub]
        if missing:
            raise ValueError(f"hub config lacks {missing}; expected the fields of a GLM config.json "
                             "(num_layers, hidden_size, num_attention_heads, vocab_size, max_sequence_length)")
        kw: dict[str, Any] = dict(
            n_layer=int(hub["num_layers"]), d_model=int(hub["hidden_size"]), n_head=int(hub["num_attention_heads"]),
            vocab_size=int(hub["vocab_size"]), max_position_embeddings=int(hub.get("max_sequence_length", 512)),
            block_position_encoding=bool(hub.get("block_position_encoding", True)))
        for ours, theirs in _HUB_OPTIONAL.items():
            if theirs in hub:
                kw[ours] = str(hub[theirs]) if ours == "attn_impl" else float(hub[theirs])
        if hub.get("attention_scale", 1.0) != 1.0:
            raise ValueError(f"attention_scale={hub['attention_scale']} is not supported (only 1.0, as in every "
                             "released checkpoint, spec §6.2)")
        kw.update(overrides)
        return cls(**kw)

    def to_hub(self) -> dict[str, Any]:
        """The hub `config.json` fields of this config (plus our own attn_impl under its own name)."""
        hub: dict[str, Any] = {
            "architectures": ["GLMModel"], "model_type": "glm",
            "num_layers": self.n_layer, "hidden_size": self.d_model, "num_attention_heads": self.n_head,
            "vocab_size": self.vocab_size, "max_sequence_length": self.max_position_embeddings,
            "block_position_encoding": self.block_position_encoding,
            "attention_scale": 1.0, "output_predict": True,
        }
        hub.update({theirs: getattr(self, ours) for ours, theirs in _HUB_OPTIONAL.items()})
        return hub


# our field -> hub config.json field (the hub names of spec §8.4; attn_impl is ours)
_HUB_OPTIONAL = {
    "embedding_dropout": "embedding_dropout_prob",
    "attention_dropout": "attention_dropout_prob",
    "hidden_dropout": "output_dropout_prob",
    "layernorm_eps": "layernorm_epsilon",
    "init_std": "initializer_range",
    "attn_impl": "attn_impl",
}

# Released sizes (spec §8.4: L, h, heads, padded V, P) and small configs for tests and the CPU demo.
# The small presets carry a placeholder vocab_size: use dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size).
PRESETS: dict[str, GLMConfig] = {
    "tiny": GLMConfig(n_layer=2, d_model=64, n_head=4, vocab_size=1024, max_position_embeddings=128),
    "small": GLMConfig(n_layer=4, d_model=128, n_head=4, vocab_size=8192, max_position_embeddings=256),
    "demo": GLMConfig(n_layer=4, d_model=256, n_head=4, vocab_size=8192, max_position_embeddings=512),
    "glm-base": GLMConfig(n_layer=12, d_model=768, n_head=12, vocab_size=30592, max_position_embeddings=512),
    "glm-large": GLMConfig(n_layer=24, d_model=1024, n_head=16, vocab_size=30592, max_position_embeddings=512),
    "glm-roberta-large": GLMConfig(n_layer=24, d_model=1024, n_head=16, vocab_size=50304,
                                   max_position_embeddings=512),
    "glm-410m": GLMConfig(n_layer=30, d_model=1024, n_head=16, vocab_size=30592, max_position_embeddings=512),
    "glm-515m": GLMConfig(n_layer=30, d_model=1152, n_head=18, vocab_size=30592, max_position_embeddings=512),
    "glm-large-chinese": GLMConfig(n_layer=24, d_model=1024, n_head=16, vocab_size=50048,
                                   max_position_embeddings=1024),
    "glm-2b": GLMConfig(n_layer=36, d_model=2048, n_head=32, vocab_size=50304, max_position_embeddings=1024),
    "glm-10b": GLMConfig(n_layer=48, d_model=4096, n_head=64, vocab_size=50304, max_position_embeddings=1024),
    "glm-10b-chinese": GLMConfig(n_layer=48, d_model=4096, n_head=64, vocab_size=50048,
                                 max_position_embeddings=1024),
}
# GLM-Doc and GLM-Sent share GLM-Large's shapes (spec §8.4).
PRESETS["glm-doc"] = PRESETS["glm-large"]
PRESETS["glm-sent"] = PRESETS["glm-large"]

