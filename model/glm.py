"""GLM — the official architecture of Du et al. (spec §5, §6), parameter for parameter, as a plain torch module.

    python -m model.glm --preset tiny          # build, count parameters, run one forward on CPU

Read top-down: GLM (embeddings, mask, tied output) -> Block (pre-LN residual) -> Attention (fused QKV) -> MLP.
Parameter names equal the official / hub checkpoints (spec §8.3), so their state dicts load with no renaming.

Shapes: B batch, T new tokens in this call, M cached tokens (KV cache), S = M + T keys, D model dim,
H heads, K head dim (D = H·K), V vocab, L layers, P max_position_embeddings.

Attention (spec §5): either `sep` (int, 0-d tensor or [B] tensor) — query i sees every cached token, every new
token j < sep (Part A, bidirectional) and every new token j <= i (Part B, causal); sep 0 = causal, sep T =
bidirectional — or an explicit 0/1 `attention_mask` [B,1,T,S'] / [B,T,S'] (its last S columns are used).
With neither, the mask is causal, as in the hub GLMModel (spec §14.16).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import GLMConfig


@dataclass
class KVCache:
    """Per-layer keys and values of every token seen so far ([B,H,M,K] each).

    Equivalent at eval to the official `mems` (spec §6.3: each layer's cached input, re-normalised and
    re-projected every step) but stores the projections instead of recomputing them.
    """

    keys: list[Tensor]
    values: list[Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def index_select(self, index: Tensor) -> KVCache:
        """Rows `index` of the batch: expands one context to n beams / candidates, or reorders beams."""
        return KVCache([k.index_select(0, index) for k in self.keys], [v.index_select(0, index) for v in self.values])


class AttnMask(NamedTuple):
    """How attention is restricted in one forward; built once in GLM, shared by every layer."""

    dense: Tensor | None = None      # [B or 1,1,T,S]: bool (True = visible) or additive float; None = all visible
    is_causal: bool = False          # plain causal (sep 0, no cache): SDPA's is_causal fast path
    block_mask: object = None        # FlexAttention BlockMask (attn_impl "flex", sep-based masks only)


class GLM(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = c = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.d_model)  # also the output layer (tied, spec §14.5)
        self.transformer = nn.ModuleDict(dict(
            position_embeddings=nn.Embedding(c.position_table_rows, c.d_model),
            embedding_dropout=nn.Dropout(c.embedding_dropout),
            layers=nn.ModuleList(Block(c) for _ in range(c.n_layer)),
            final_layernorm=nn.LayerNorm(c.d_model, eps=c.layernorm_eps),
        ))
        if c.block_position_encoding:
            self.transformer["block_position_embeddings"] = nn.Embedding(c.position_table_rows, c.d_model)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, module: nn.Module | None = None) -> None:
        """The official initialisation (spec §6.4) of every parameter, or of `module`'s own parameters only
        (one submodule: Composer's meta init calls this per module after FSDP2 sharding). Call it after
        meta-device construction + `to_empty`; the rule depends only on each parameter's full name."""
        std, out_std = self.config.init_std, self.config.init_std / math.sqrt(2.0 * self.config.n_layer)
        if module is None:
            params = self.named_parameters()
        else:
            prefix = next((n for n, m in self.named_modules() if m is module), None)
            if prefix is None:
                raise ValueError(f"init_weights: {type(module).__name__} is not a submodule of this GLM")
            params = ((f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False))
        for name, p in params:
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "layernorm" in name:
                nn.init.ones_(p)
            elif name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
                nn.init.normal_(p, 0.0, out_std)  # residual-branch outputs: always scaled by 1/sqrt(2L)
            else:
                nn.init.normal_(p, 0.0, std)      # embeddings, position tables, QKV, h->4h

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: Tensor, position_ids: Tensor, block_position_ids: Tensor | None = None,
                sep: int | Tensor | None = None, attention_mask: Tensor | None = None,
                mems: KVCache | None = None, return_mems: bool = False, return_hidden: bool = False):
        """input_ids [B,T]; position_ids [B,T] (or the official [B,2,T] with block_position_ids None);
        block_position_ids [B,T] (zeros when omitted); sep / attention_mask as in the module docstring;
        mems: a KVCache from an earlier call with return_mems=True.

        Returns logits [B,T,V] (fp32 when the model is), or the final-LayerNorm output [B,T,D] when
        return_hidden; with return_mems, a pair (that, KVCache of all S tokens).
        """
        c = self.config
        if position_ids.dim() == 3:  # the official layout: rows (position, block position), spec §3.6
            if block_position_ids is not None:
                raise ValueError("position_ids is [B,2,T] (official layout) AND block_position_ids was given; "
                                 "pass either the [B,2,T] tensor alone or two [B,T] tensors")
            position_ids, block_position_ids = position_ids[:, 0], position_ids[:, 1]
        if position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)} but input_ids has "
                             f"{tuple(input_ids.shape)}; pass [B,T] (or the official [B,2,T])")

        x = self.word_embeddings(input_ids) + self.transformer.position_embeddings(position_ids)  # [B,T,D]
        if c.block_position_encoding:
            if block_position_ids is None:
                block_position_ids = torch.zeros_like(position_ids)  # all Part A
            x = x + self.transformer.block_position_embeddings(block_position_ids)
        elif block_position_ids is not None and not getattr(self, "_warned_block", False):
            self._warned_block = True
            warnings.warn("block_position_ids ignored: this model has block_position_encoding=False", stacklevel=2)
        x = self.transformer.embedding_dropout(x)

        B, T = input_ids.shape
        M = mems.length if mems is not None else 0
        mask = self._attention_mask(B, T, M, sep, attention_mask, x.device)
        new_keys, new_values = [], []
        for i, block in enumerate(self.transformer.layers):
            cache = (mems.keys[i], mems.values[i]) if mems is not None else None
            x, (k, v) = block(x, mask, cache)
            if return_mems:  # else drop them now: holding them would undo activation checkpointing's savings
                new_keys.append(k)
                new_values.append(v)
        x = self.transformer.final_layernorm(x)

        out = x if return_hidden else F.linear(x, self.word_embeddings.weight)  # tied output, no bias (§6.2)
        return (out, KVCache(new_keys, new_values)) if return_mems else out

    def _attention_mask(self, B: int, T: int, M: int, sep, attention_mask: Tensor | None, device) -> AttnMask:
        """Spec §5. Never builds a dense mask when none is needed (causal, fully visible, one new token)."""
        S = M + T
        if attention_mask is not None:
            if sep is not None:
                raise ValueError("pass either sep or attention_mask, not both")
            m = attention_mask.unsqueeze(1) if attention_mask.dim() == 3 else attention_mask
            if m.dim() != 4 or m.shape[2] != T or m.shape[-1] < S:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected [B,1,T,>=S] "
                                 f"with T={T} queries and S={S} keys (cache {M} + new {T})")
            # A query row with no visible key gets zeros from SDPA (the official code averages V there): only
            # padding rows are like that, and they carry no loss.
            return AttnMask(dense=m[..., -S:].to(device=device) > 0.5)
        if sep is None:
            sep = 0  # hub GLMModel default: causal (spec §14.16)
        if isinstance(sep, Tensor) and sep.dim() == 1 and sep.shape[0] not in (1, B):
            raise ValueError(f"sep has shape {tuple(sep.shape)}; expected an int, a 0-d tensor or [B={B}]")
        if not isinstance(sep, Tensor) or sep.dim() == 0:  # one sep for the whole batch
            s = int(sep)
            if T == 1 or s >= T:
                return AttnMask()                  # every query sees every key
            if s == 0 and M == 0:
                return AttnMask(is_causal=True)
            sep = torch.full((1,), s, dtype=torch.long, device=device)
        sep = sep.to(device=device, dtype=torch.long)
        if self.config.attn_impl == "flex":
            return AttnMask(block_mask=_flex_block_mask(sep.expand(B).contiguous(), B, T, M, device))
        q = torch.arange(T, device=device).view(1, 1, T, 1)
        k = torch.arange(S, device=device).view(1, 1, 1, S)
        visible = (k < M + sep.view(-1, 1, 1, 1)) | (k <= q + M)  # [B,1,T,S]
        # Additive, with the official fill value -65504 (fp16-safe, spec §5): SDPA's CPU kernel runs faster with a
        # float mask than with a bool one, and every row sees at least its own token, so no row is all -65504.
        return AttnMask(dense=torch.zeros(visible.shape, device=device).masked_fill_(~visible, -65504.0))


class Block(nn.Module):
    """Pre-LayerNorm residual block (spec §6.2; the paper's "rearranged" LN, §14.6)."""

    def __init__(self, c: GLMConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(c.d_model, eps=c.layernorm_eps)
        self.attention = Attention(c)
        self.post_attention_layernorm = nn.LayerNorm(c.d_model, eps=c.layernorm_eps)
        self.mlp = MLP(c)

    def forward(self, x: Tensor, mask: AttnMask, cache: tuple[Tensor, Tensor] | None):
        a, kv = self.attention(self.input_layernorm(x), mask, cache)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class Attention(nn.Module):
    def __init__(self, c: GLMConfig):
        super().__init__()
        self.n_head, self.head_dim, self.attn_impl = c.n_head, c.head_dim, c.attn_impl
        self.attention_dropout = c.attention_dropout
        self.query_key_value = nn.Linear(c.d_model, 3 * c.d_model)  # [3D,D]: rows Q, then K, then V (spec §6.7)
        self.dense = nn.Linear(c.d_model, c.d_model)
        self.output_dropout = nn.Dropout(c.hidden_dropout)

    def forward(self, x: Tensor, mask: AttnMask, cache: tuple[Tensor, Tensor] | None):
        B, T, D = x.shape
        q, k, v = self.query_key_value(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # [B,H,T,K]
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # [B,H,S,K]
        p_drop = self.attention_dropout if self.training else 0.0
        if mask.block_mask is not None:
            if p_drop > 0 and not getattr(self, "_warned_dropout", False):
                self._warned_dropout = True
                warnings.warn(f"attention_dropout={p_drop} is ignored by attn_impl='flex' (FlexAttention has no "
                              "dropout); set attention_dropout=0 or attn_impl='sdpa'", stacklevel=2)
            y = _flex_attention(q.device.type)(q, k, v, block_mask=mask.block_mask)
        else:
            dense = mask.dense
            if dense is not None and dense.is_floating_point() and dense.dtype != q.dtype:
                dense = dense.to(q.dtype)  # SDPA wants the q dtype (bf16 under autocast)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, dropout_p=p_drop,
                                               is_causal=mask.is_causal)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.output_dropout(self.dense(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, c: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(c.d_model, c.ffn_dim)
        self.dense_4h_to_h = nn.Linear(c.ffn_dim, c.d_model)
        self.dropout = nn.Dropout(c.hidden_dropout)

    def forward(self, x: Tensor) -> Tensor:
        # tanh GeLU as in the original mpu/transformer.py gelu_impl (the hub code's erf GeLU differs, §14.7)
        return self.dropout(self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh")))


def glm_loss(logits: Tensor, targets: Tensor, loss_mask: Tensor, reduction: str = "mean") -> Tensor:
    """THE pretraining loss (spec §6.6), used by training, evaluation and the demo: cross-entropy in fp32 of
    logits [B,T,V] against targets [B,T] (already aligned: no shift), weighted by loss_mask [B,T] (1 on Part B).

    reduction "mean": Σ CE·mask / Σ mask (a scalar); "none": the masked per-token losses CE·mask [B,T], for
    per-sample or per-objective sums."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r}: choose mean or none")
    sel = loss_mask != 0                       # only Part B rows reach the fp32 cast and the softmax over V
    ce = F.cross_entropy(logits[sel].float(), targets[sel], reduction="none") * loss_mask[sel].float()   # [N]
    if reduction == "none":
        return torch.zeros(targets.shape, dtype=ce.dtype, device=ce.device).masked_scatter(sel, ce)
    return ce.sum() / loss_mask.float().sum().clamp(min=1.0)


# ---- FlexAttention (attn_impl "flex"): the sep mask as a block-sparse mask_mod, no [B,1,T,S] tensor -------------
@functools.cache
def _flex_attention(device_type: str):
    """flex_attention, compiled on CUDA (fused kernel); eager elsewhere (correct but unfused: tests only)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention


def _flex_block_mask(sep: Tensor, B: int, T: int, M: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):  # same rule as the dense mask in GLM._attention_mask
        return (kv_idx < M + sep[b]) | (kv_idx <= q_idx + M)

    return create_block_mask(mask_mod, B, None, T, M + T, device=device, _compile=torch.device(device).type == "cuda")


if __name__ == "__main__":
    import argparse

    from model.config import PRESETS

    ap = argparse.ArgumentParser(description="Build a GLM preset and run one forward pass (real weights up to "
                                 "1B parameters, else on the meta device: shapes only, no memory).")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    device = torch.device("cpu" if cfg.num_params < 1e9 else "meta")
    with device:
        model = GLM(cfg).eval()
    print(f"{args.preset}: {model.num_params / 1e6:.1f}M parameters (analytic {cfg.num_params / 1e6:.1f}M)")
    ids = torch.randint(0, cfg.vocab_size, (2, 16), device=device)
    pos = torch.arange(16, device=device).expand(2, 16)
    with torch.no_grad():
        logits = model(ids, pos, sep=torch.tensor([8, 12], device=device))
    print(f"forward on {device.type}: logits {tuple(logits.shape)}")
