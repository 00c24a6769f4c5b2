"""model/glm.py and model/config.py against the official GLM test vectors (../shared/testvectors) and by property.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_model_glm.py
"""

from __future__ import annotations

import ast
import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.config import PRESETS, GLMConfig
from model.glm import GLM, glm_loss

ATOL = 1e-5  # fp32 official vs fp64 official differ by 1.5e-6 (testvectors/README.md)


def official_model(tv) -> GLM:
    sd = {k: v.clone() for k, v in tv["state_dict"].items()}
    return load_checkpoint(sd, tv["config"]).eval()


@pytest.fixture(scope="module")
def official(tv) -> GLM:
    return official_model(tv)


# ---- the official test vectors --------------------------------------------------------------------------------

def test_logits_per_sample_sep(tv, official):
    with torch.no_grad():
        logits = official(tv["input_ids"], tv["position_ids"], sep=tv["sep"])
        split = official(tv["input_ids"], tv["position_ids"][:, 0], tv["position_ids"][:, 1], sep=tv["sep"])
    torch.testing.assert_close(logits, tv["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(split, logits, atol=0, rtol=0)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_logits_scalar_sep(tv, official, as_tensor):
    for s, expected in zip(tv["scalar_seps"], tv["logits_scalar_sep"]):
        with torch.no_grad():
            logits = official(tv["input_ids"], tv["position_ids"], sep=s if as_tensor else int(s))
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0, msg=lambda m, s=s: f"sep={int(s)}: {m}")


def test_logits_explicit_mask(tv, official):
    with torch.no_grad():
        four_d = official(tv["input_ids"], tv["position_ids"], attention_mask=tv["explicit_mask"])
        three_d = official(tv["input_ids"], tv["position_ids"], attention_mask=tv["explicit_mask"][:, 0])
    torch.testing.assert_close(four_d, tv["logits_explicit_mask"], atol=ATOL, rtol=0)
    torch.testing.assert_close(three_d, four_d, atol=0, rtol=0)


def test_hidden_states(tv, official):
    captured = []
    hooks = [official.transformer.embedding_dropout.register_forward_hook(lambda m, i, o: captured.append(o))]
    hooks += [layer.register_forward_hook(lambda m, i, o: captured.append(o[0]))  # blocks return (x, kv)
              for layer in official.transformer.layers]
    try:
        with torch.no_grad():
            last = official(tv["input_ids"], tv["position_ids"], sep=tv["sep"], return_hidden=True)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(torch.stack(captured), tv["hidden_states"], atol=ATOL, rtol=0)
    torch.testing.assert_close(last, tv["last_hidden"], atol=ATOL, rtol=0)


def test_loss_and_gradients(tv):
    model = official_model(tv)
    logits = model(tv["input_ids"], tv["position_ids"], sep=tv["sep"])
    loss = glm_loss(logits, tv["targets"], tv["loss_mask"])
    torch.testing.assert_close(loss, tv["loss"], atol=ATOL, rtol=0)
    loss.backward()
    grads = dict(model.named_parameters())
    assert set(grads) == set(tv["grads"])
    for name, expected in tv["grads"].items():
        torch.testing.assert_close(grads[name].grad, expected, atol=ATOL, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_training_loss_and_eval_metric_are_glm_loss(tv):
    """The trainer's loss (GLMComposer.loss) and its eval loss metric give the official loss: one function."""
    from model.composer import GLMComposer

    composer = GLMComposer(GLMConfig.from_hub(tv["config"]))
    composer.model.load_state_dict(tv["state_dict"])
    pos = tv["position_ids"]
    batch = {"input_ids": tv["input_ids"], "position_ids": pos[:, 0], "block_position_ids": pos[:, 1],
             "sep": tv["sep"], "targets": tv["targets"], "loss_mask": tv["loss_mask"],
             "objective": ["bert"] * len(tv["sep"])}
    composer.eval()
    with torch.no_grad():
        logits = composer(batch)
        torch.testing.assert_close(composer.loss(logits, batch), tv["loss"], atol=ATOL, rtol=0)
        metric = composer.get_metrics()["loss"]
        composer.update_metric(batch, logits, metric)
        torch.testing.assert_close(metric.compute(), tv["loss"], atol=ATOL, rtol=0)
    per_token = glm_loss(logits, tv["targets"], tv["loss_mask"], reduction="none")
    assert per_token.shape == tv["targets"].shape
    torch.testing.assert_close(per_token.sum() / tv["loss_mask"].sum(), tv["loss"], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="reduction='sum'"):
        glm_loss(logits, tv["targets"], tv["loss_mask"], reduction="sum")


def test_incremental_decoding_matches_official(tv, official):
    with torch.no_grad():
        logits, cache = official(tv["decode_prefill_input_ids"], tv["decode_prefill_position_ids"],
                                 sep=tv["decode_prefill_sep"], return_mems=True)
        torch.testing.assert_close(logits, tv["decode_prefill_logits"], atol=ATOL, rtol=0)
        for k in range(tv["decode_step_input_ids"].shape[0]):
            ids = tv["decode_step_input_ids"][k]
            assert torch.equal(ids[:, 0], logits[:, -1].argmax(-1))  # each step feeds the greedy token
            logits, cache = official(ids, tv["decode_step_position_ids"][k], sep=tv["decode_step_sep"][k],
                                     mems=cache, return_mems=True)
            torch.testing.assert_close(logits, tv["decode_step_logits"][k], atol=ATOL, rtol=0)
            assert cache.length == int(tv["decode_step_mem_length_after"][k])
        full = official(tv["decode_full_input_ids"], tv["decode_full_position_ids"], sep=tv["decode_prefill_sep"])
    torch.testing.assert_close(full, tv["decode_full_logits"], atol=ATOL, rtol=0)


# ---- attention properties ---------------------------------------------------------------------------------------

def tiny(**kw) -> GLM:
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=64, embedding_dropout=0.0, attention_dropout=0.0,
                              hidden_dropout=0.0, **kw)
    return GLM(cfg).eval()


def batch(B=2, T=12, seps=(5, 8)):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(9, 64, (B, T), generator=g)
    sep = torch.tensor(seps)
    pos = torch.arange(T).expand(B, T)
    block = (pos >= sep[:, None]).long() * (pos - sep[:, None] + 1)
    return ids, pos.clone(), block, sep


@torch.no_grad()
def test_changing_part_b_token_never_changes_earlier_or_part_a():
    model = tiny()
    ids, pos, block, sep = batch()
    base = model(ids, pos, block, sep=sep)
    for b in range(2):
        s = int(sep[b])
        for j in range(s, ids.shape[1]):
            changed = ids.clone()
            changed[b, j] = (changed[b, j] + 1 - 9) % 55 + 9
            out = model(changed, pos, block, sep=sep)
            torch.testing.assert_close(out[b, :j], base[b, :j], atol=1e-6, rtol=0)
            assert (out[b, j:] - base[b, j:]).abs().amax(-1).min() > 1e-4  # j and every later B position see it
            torch.testing.assert_close(out[1 - b], base[1 - b], atol=1e-6, rtol=0)


@torch.no_grad()
def test_changing_part_a_token_changes_everything():
    model = tiny()
    ids, pos, block, sep = batch()
    base = model(ids, pos, block, sep=sep)
    for j in range(int(sep[0])):
        changed = ids.clone()
        changed[0, j] = (changed[0, j] + 1 - 9) % 55 + 9
        out = model(changed, pos, block, sep=sep)
        assert (out[0] - base[0]).abs().amax(-1).min() > 1e-4  # every A and B position sees Part A


@torch.no_grad()
def test_sep_extremes_and_forms_agree():
    model = tiny()
    ids, pos, block, _ = batch()
    T = ids.shape[1]
    causal = model(ids, pos, block, sep=0)
    torch.testing.assert_close(model(ids, pos, block), causal, atol=0, rtol=0)  # default: causal (spec §14.16)
    tril = torch.tril(torch.ones(T, T)).expand(2, 1, T, T)
    torch.testing.assert_close(model(ids, pos, block, attention_mask=tril), causal, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(ids, pos, block, sep=torch.tensor([0, 0])), causal, atol=1e-6, rtol=0)
    full = model(ids, pos, block, sep=T)
    torch.testing.assert_close(model(ids, pos, block, sep=torch.tensor([T, T])), full, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(ids, pos, block, attention_mask=torch.ones(2, 1, T, T)), full, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="either sep or attention_mask"):
        model(ids, pos, block, sep=3, attention_mask=tril)
    with pytest.raises(ValueError, match="sep has shape"):
        model(ids, pos, block, sep=torch.tensor([1, 2, 3]))


@torch.no_grad()
def test_kv_cache_chunks_match_one_pass():
    """A prefix-LM pass equals: Part A with sep=len(A), then Part B in two chunks against the cache (sep 0)."""
    model = tiny()
    ids, pos, block, sep = batch(seps=(6, 6))
    full = model(ids, pos, block, sep=6)
    a, cache = model(ids[:, :6], pos[:, :6], block[:, :6], sep=6, return_mems=True)
    b1, cache = model(ids[:, 6:9], pos[:, 6:9], block[:, 6:9], sep=0, mems=cache, return_mems=True)
    b2 = model(ids[:, 9:], pos[:, 9:], block[:, 9:], sep=0, mems=cache)
    torch.testing.assert_close(torch.cat([a, b1, b2], 1), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_flex_matches_sdpa_on_cpu():
    """The flex path's mask_mod gives the dense mask's answers (eager FlexAttention on CPU; fused only on CUDA)."""
    sdpa, flex = tiny(), tiny(attn_impl="flex")
    flex.load_state_dict(sdpa.state_dict())
    ids, pos, block, sep = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(flex(ids, pos, block, sep=sep), sdpa(ids, pos, block, sep=sep), atol=1e-5, rtol=0)
        _, c1 = sdpa(ids[:, :4], pos[:, :4], block[:, :4], sep=4, return_mems=True)
        _, c2 = flex(ids[:, :4], pos[:, :4], block[:, :4], sep=4, return_mems=True)
        torch.testing.assert_close(flex(ids[:, 4:], pos[:, 4:], block[:, 4:], sep=torch.tensor([3, 5]), mems=c2),
                                   sdpa(ids[:, 4:], pos[:, 4:], block[:, 4:], sep=torch.tensor([3, 5]), mems=c1),
                                   atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_flex_on_cuda_matches_official(tv):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = load_checkpoint(tv["state_dict"], GLMConfig.from_hub(tv["config"], attn_impl="flex"), device="cuda")
    ids, pos, sep = tv["input_ids"].cuda(), tv["position_ids"].cuda(), tv["sep"].cuda()
    logits = model(ids, pos, sep=sep)
    torch.testing.assert_close(logits.cpu(), tv["logits"], atol=1e-4, rtol=0)
    loss = glm_loss(logits, tv["targets"].cuda(), tv["loss_mask"].cuda())
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), tv["grads"][name], atol=1e-4, rtol=1e-3)


# ---- config and parameters -------------------------------------------------------------------------------------

SPEC_PARAMS_M = {  # spec §8.4, millions, computed there from the shapes of §8.3
    "glm-base": 109.3, "glm-large": 334.7, "glm-410m": 410.3, "glm-515m": 514.6, "glm-roberta-large": 354.9,
    "glm-large-chinese": 355.7, "glm-2b": 1920.1, "glm-10b": 9880.7, "glm-10b-chinese": 9879.6,
}


@pytest.mark.parametrize("name", sorted(SPEC_PARAMS_M))
def test_released_preset_parameter_counts(name):
    cfg = PRESETS[name]
    with torch.device("meta"):  # no memory: 10B parameters are only shapes here
        model = GLM(cfg)
    assert model.num_params == cfg.num_params
    assert round(cfg.num_params / 1e6, 1) == SPEC_PARAMS_M[name]
    assert cfg.head_dim == 64 and cfg.ffn_dim == 4 * cfg.d_model


@pytest.mark.parametrize("name", ["tiny", "small", "demo"])
def test_small_presets_build_and_run(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        n = GLM(cfg).num_params
    assert n == cfg.num_params
    if name == "demo":
        assert 5e6 <= n <= 15e6


def test_state_dict_names_match_official(tv, official):
    assert {k: tuple(v.shape) for k, v in official.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in tv["state_dict"].items()}


def test_without_block_positions_has_p_rows_and_no_block_table():
    model = tiny(block_position_encoding=False)
    sd = model.state_dict()
    assert "transformer.block_position_embeddings.weight" not in sd
    assert sd["transformer.position_embeddings.weight"].shape[0] == model.config.max_position_embeddings
    ids, pos, _, sep = batch()
    assert model(ids, pos, sep=sep).shape == (2, 12, 64)
    assert sum(p.numel() for p in model.parameters()) == model.config.num_params


def test_hub_config_round_trip_and_validation(tv):
    cfg = GLMConfig.from_hub(tv["config"])
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.vocab_size, cfg.max_position_embeddings) == (2, 64, 4, 211, 32)
    assert cfg.position_table_rows == tv["config"]["position_table_rows"]
    assert cfg.embedding_dropout == 0.0 and cfg.layernorm_eps == 1e-5
    assert GLMConfig.from_hub(cfg.to_hub()) == cfg
    for preset in PRESETS.values():
        assert GLMConfig.from_hub(preset.to_hub()) == preset
    assert dataclasses.replace(PRESETS["demo"], vocab_size=123).vocab_size == 123
    with pytest.raises(ValueError, match="n_head"):
        GLMConfig(n_layer=1, d_model=10, n_head=3, vocab_size=5)
    with pytest.raises(ValueError, match="attn_impl"):
        GLMConfig(n_layer=1, d_model=8, n_head=2, vocab_size=5, attn_impl="xformers")
    with pytest.raises(ValueError, match="num_layers"):
        GLMConfig.from_hub({"hidden_size": 8})


def test_init_weights_after_meta_construction():
    cfg = dataclasses.replace(PRESETS["small"], vocab_size=512)
    with torch.device("meta"):
        model = GLM(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    sd = model.state_dict()
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
    assert abs(sd["word_embeddings.weight"].std().item() - cfg.init_std) < 2e-3
    assert abs(sd["transformer.layers.0.attention.query_key_value.weight"].std().item() - cfg.init_std) < 2e-3
    assert abs(sd["transformer.layers.1.mlp.dense_4h_to_h.weight"].std().item() - out_std) < 1e-3
    assert abs(sd["transformer.layers.1.attention.dense.weight"].std().item() - out_std) < 1e-3
    assert torch.all(sd["transformer.layers.0.mlp.dense_h_to_4h.bias"] == 0)
    assert torch.all(sd["transformer.final_layernorm.weight"] == 1)


def test_meta_init_per_module_gives_the_eager_bytes():
    """Composer's FSDP2 meta init (to_empty, then param_init_fn per module, children first) and the eager
    GLM.init_weights draw the same numbers for a seed: one init rule, one parameter order."""
    from model.composer import GLMComposer

    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=96)
    eager = GLM(cfg)
    torch.manual_seed(7)
    eager.init_weights()

    meta = GLMComposer(cfg, init_device="meta").model
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")

    def children_first(m):
        for c in m.children():
            yield from children_first(c)
        yield m

    torch.manual_seed(7)
    for m in children_first(meta):
        meta.param_init_fn(m)
    got, want = meta.state_dict(), eager.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    with pytest.raises(ValueError, match="not a submodule"):
        meta.init_weights(torch.nn.Linear(2, 2))


def test_model_files_import_no_training_stack():
    """house style: model/glm.py (and its neighbours here) never import composer, ray, pyarrow or pipeline/."""
    root = Path(__file__).resolve().parents[1] / "model"
    for name in ("glm.py", "config.py", "generate.py", "checkpoint.py"):
        tree = ast.parse((root / name).read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        bad = {m for m in mods if m.split(".")[0] in ("composer", "ray", "pyarrow", "pipeline")}
        assert not bad, f"model/{name} imports {bad}"
