"""pipeline/seq2seq.py (pairs -> GLM samples) and model/seq2seq.py (generation, exact match, ROUGE).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_seq2seq.py
"""

from __future__ import annotations

import dataclasses
import gzip
import json

import fsspec
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from model.composer import GLMComposer
from model.config import PRESETS
from model.generate import build_context, fill_blanks
from model.glm import glm_loss
from model.seq2seq import evaluate_generation, rouge, source_context
from pipeline.infilling import _sample_dict, pad_batch, reconstruct
from pipeline.seq2seq import encode_pair, read_pairs
from pipeline.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_path) -> Tokenizer:
    return Tokenizer.load(tokenizer_path)


def _part_a(tok, source: str, max_source: int) -> list[int]:
    sp = tok.specials
    return [sp.cls, *tok.encode(source)[:max_source - 2], sp.gmask]


# ---- layout ---------------------------------------------------------------------------------------------------

def test_encode_pair_layout_matches_hand_built_and_reconstructs(tok):
    sp = tok.specials
    src, tgt = tok.encode("Gentlemen of the Senate"), tok.encode("and House of Representatives")
    s = encode_pair(tok, "Gentlemen of the Senate", "and House of Representatives", max_source=64, max_target=32)
    a = [sp.cls, *src, sp.gmask]
    A, G = len(a), len(tgt) + 1                      # Part B: sop + target, targets target + eop
    assert s["input_ids"].tolist() == a + [sp.sop, *tgt]
    assert s["targets"].tolist() == a + [*tgt, sp.eop]
    assert s["loss_mask"].tolist() == [0] * A + [1] * G
    assert s["position_ids"].tolist() == list(range(A)) + [A - 1] * G     # B at the [gMASK] index
    assert s["block_position_ids"].tolist() == [0] * A + list(range(1, G + 1))
    assert s["sep"] == A and s["layout"] == "gpt_single_span"
    assert not s["source_truncated"] and not s["target_truncated"]
    # the pipeline.infilling sample: its keys and the shard columns' dtypes
    ref = _sample_dict(s["input_ids"], s["targets"], s["loss_mask"], s["position_ids"], s["block_position_ids"],
                       s["sep"], s["spans"])
    assert set(ref) <= set(s) and all(s[k].dtype == ref[k].dtype for k in ref if k not in ("sep", "spans"))
    assert reconstruct(s, sp).tolist() == [sp.cls, *src, *tgt]
    # the --no-block-position ablation: every Part B block position is 1, the rest unchanged
    nb = encode_pair(tok, "Gentlemen of the Senate", "and House of Representatives", max_source=64, max_target=32,
                     block_position_encoding=False)
    assert nb["block_position_ids"].tolist() == [0] * A + [1] * G
    assert nb["input_ids"].tolist() == s["input_ids"].tolist() and nb["targets"].tolist() == s["targets"].tolist()
    # generation sees exactly this Part A: fill_blanks' context is the training Part A, unchanged
    ctx = source_context(src, sp, 64)
    assert ctx == a and build_context(ctx, sp) == (a, [A - 1])


def test_loss_covers_exactly_target_and_eop_through_pad_batch_and_glm_loss(tok):
    sp = tok.specials
    pairs = [("To the Senate", "The treaty"), ("We the people of the United States", "in order to form")]
    samples = [encode_pair(tok, a, b, max_source=32, max_target=16) for a, b in pairs]
    for s, (_, b) in zip(samples, pairs):
        assert s["targets"][s["loss_mask"] == 1].tolist() == [*tok.encode(b), sp.eop]
    batch = {k: torch.as_tensor(v, dtype=torch.long) for k, v in pad_batch(samples, pad_id=sp.pad).items()}
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, tok.vocab_size)
    rows = [(i, j) for i, s in enumerate(samples) for j in np.flatnonzero(s["loss_mask"]).tolist()]
    hand = torch.stack([F.cross_entropy(logits[i, j], batch["targets"][i, j]) for i, j in rows]).mean()
    torch.testing.assert_close(glm_loss(logits, batch["targets"], batch["loss_mask"]), hand)
    assert len(rows) == sum(len(tok.encode(b)) + 1 for _, b in pairs)


def test_truncation_keeps_source_head_and_cuts_target_with_its_eop(tok):
    sp = tok.specials
    long_src = "It is a source of great satisfaction to me that the prospects of our country continue to improve"
    long_tgt = "the public debt has been reduced and the revenue has increased beyond every expectation"
    src, tgt = tok.encode(long_src), tok.encode(long_tgt)
    assert len(src) > 12 and len(tgt) > 10
    s = encode_pair(tok, long_src, long_tgt, max_source=12, max_target=8)
    assert s["source_truncated"] and s["target_truncated"] and s["layout"] == "gpt_suffix"
    assert s["input_ids"][:s["sep"]].tolist() == [sp.cls, *src[:10], sp.gmask] == source_context(src, sp, 12)
    # (target + eop)[:8] = the first 8 target tokens: no eop, as the official Seq2SeqDataset
    assert s["targets"][s["loss_mask"] == 1].tolist() == tgt[:8]
    assert s["input_ids"][s["sep"]:].tolist() == [sp.sop, *tgt[:7]]
    assert len(s["input_ids"]) == 12 + 8 and s["position_ids"].max() == 11 and s["block_position_ids"].max() == 8
    assert reconstruct(s, sp).tolist() == [sp.cls, *src[:10], *tgt[:8]]
    # the boundary: target + eop fits exactly -> kept whole with eop; one token longer -> cut, no eop
    n = len(tok.encode("the public debt"))
    fit = encode_pair(tok, "x", "the public debt", max_source=8, max_target=n + 1)
    assert not fit["target_truncated"] and fit["targets"][-1] == sp.eop
    cut = encode_pair(tok, "x", "the public debt", max_source=8, max_target=n)
    assert cut["target_truncated"] and cut["targets"][cut["loss_mask"] == 1].tolist() == tok.encode("the public debt")
    for bad in (dict(max_source=2, max_target=8), dict(max_source=8, max_target=0)):
        with pytest.raises(ValueError, match="max_(source|target)="):
            encode_pair(tok, "a", "b", **bad)
    with pytest.raises(ValueError, match="target ' ' encodes to no tokens"):
        encode_pair(tok, "a", " ", max_source=8, max_target=8)


# ---- reading pairs --------------------------------------------------------------------------------------------

def test_read_pairs_local_gzip_and_fsspec_url(tmp_path):
    rows = [{"source": f"source {i}", "target": f"target {i}", "id": i} for i in range(5)]
    text = "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]) + "\n"
    local = tmp_path / "pairs.jsonl"
    local.write_text(text)
    assert read_pairs(str(local)) == rows == read_pairs(str(local))          # blank line skipped; fields kept
    assert read_pairs(str(local), limit=3) == rows[:3]
    with gzip.open(tmp_path / "pairs.jsonl.gz", "wt") as f:
        f.write(text)
    assert read_pairs(str(tmp_path / "pairs.jsonl.gz")) == rows
    with fsspec.open("memory://s2s/pairs.jsonl", "w") as f:
        f.write(text)
    assert read_pairs("memory://s2s/pairs.jsonl", limit=2) == rows[:2]
    with pytest.raises(ValueError, match="limit=-1"):
        read_pairs(str(local), limit=-1)


@pytest.mark.parametrize("line, message", [
    (b'{"source": "a", "target": "b"', "pairs.jsonl:2: not valid JSON"),
    (b'["a", "b"]', "pairs.jsonl:2: a JSON list, not an object"),
    (b'{"source": "a"}', "pairs.jsonl:2: no 'target' field"),
    (b'{"input": "a", "target": "b"}', "pairs.jsonl:2: no 'source' field .*'input'"),
    (b'{"source": "a", "target": "  "}', "pairs.jsonl:2: field 'target' is empty"),
    (b'{"source": 3, "target": "b"}', "pairs.jsonl:2: field 'source' is a int"),
    (b'{"source": "a", "target": null}', "pairs.jsonl:2: field 'target' is a NoneType"),
    (b'{"source": "caf\xe9", "target": "b"}', "pairs.jsonl:2: not valid UTF-8"),
], ids=["json", "list", "no-target", "no-source", "empty", "int", "null", "utf8"])
def test_read_pairs_bad_line_names_file_line_and_fix(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"source": "ok", "target": "ok"}\n' + line + b"\n")
    with pytest.raises(ValueError, match=message) as e:
        read_pairs(str(path))
    assert str(path) in str(e.value)


def test_read_pairs_missing_or_empty_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_pairs(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no pairs"):
        read_pairs(str(tmp_path / "empty.jsonl"))


# ---- ROUGE ----------------------------------------------------------------------------------------------------

def test_rouge_equals_rouge_score_and_the_hand_count():
    preds = ["the cat on the mat", "a quick brown dog", "nothing in common"]
    refs = ["the cat sat on the mat", "the quick brown fox", "entirely different words"]
    got = rouge(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for k in ("rouge1", "rouge2", "rougeL"):
        assert got[k] == pytest.approx(np.mean([scorer.score(r, p)[k].fmeasure for p, r in zip(preds, refs)]))
    # pair 1 by hand: 5 of 6 reference unigrams (P 5/5, R 5/6), 3 shared bigrams (P 3/4, R 3/5), LCS 5
    one = rouge(preds[:1], refs[:1])
    assert one["rouge1"] == pytest.approx(10 / 11) and one["rougeL"] == pytest.approx(10 / 11)
    assert one["rouge2"] == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))
    # rouge-score's default tokenizer keeps [a-z0-9] only: Cyrillic vanishes; "whitespace" keeps it
    assert rouge(["привет мир"], ["привет мир"])["rouge1"] == 0.0
    assert rouge(["привет мир"], ["привет мир"], rouge_tokenizer="whitespace")["rouge1"] == 1.0
    assert rouge(["你好世界"], ["你好世"], rouge_tokenizer=list)["rouge1"] == pytest.approx(2 * 1 * 0.75 / 1.75)
    with pytest.raises(ValueError, match="rouge_tokenizer='nltk'"):
        rouge(preds, refs, rouge_tokenizer="nltk")


def test_evaluate_generation_runs_every_strategy_and_counts_truncated_sources(tok):
    torch.manual_seed(0)
    glm = GLMComposer(dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size)).model
    pairs = [{"source": "Fellow citizens of the Senate", "target": "and of the House"},
             {"source": "the war", "target": "peace"}]
    assert len(tok.encode(pairs[0]["source"])) > 4 >= len(tok.encode(pairs[1]["source"]))   # max_source 6 keeps 4
    runs = [evaluate_generation(glm, tok, pairs, strategy=s, num_beams=2, max_new_tokens=3, max_source=6)
            for s in ("greedy", "beam", "sample")]
    for r in runs:
        assert r["num_pairs"] == 2 and r["source_truncated"] == 1 and len(r["predictions"]) == 2
        assert all(isinstance(p, str) for p in r["predictions"]) and 0.0 <= r["rougeL"] <= 1.0
    ctx = source_context(tok.encode(pairs[0]["source"]), tok.specials, 6)
    assert len(ctx) == 6
    assert runs[0]["predictions"][0] == tok.decode(fill_blanks(glm, ctx, tok.specials, "greedy", 3)[0])
    with pytest.raises(ValueError, match="pairs is empty"):
        evaluate_generation(glm, tok, [])


# ---- learning: copy and reverse -------------------------------------------------------------------------------

def _digit_pairs(rng: np.random.Generator, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        s = "".join(rng.choice(list("0123456789"), size=int(rng.integers(3, 7))))
        task = "copy" if rng.random() < 0.5 else "reverse"
        out.append({"source": f"{task} {s}", "target": s if task == "copy" else s[::-1]})
    return out


@pytest.mark.slow
def test_tiny_glm_learns_copy_and_reverse_with_the_pretraining_loss(tok, tmp_path):
    """Random digit strings of length 3-6 (the session sentencepiece model splits digits: '▁' then one token per
    digit); one model learns both tasks, named by the first source word, with GLMComposer's loss; held-out pairs
    are generated through fill_blanks (greedy and beam)."""
    rng = np.random.default_rng(0)
    train = _digit_pairs(rng, 3000)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in train))
    train = read_pairs(str(path))
    seen = {p["source"] for p in train}
    fresh = [p for p in _digit_pairs(np.random.default_rng(1), 300) if p["source"] not in seen]
    dev, held_out = fresh[:40], fresh[40:80]       # dev decides when to stop; held_out is scored once
    assert len(held_out) == 40 and {p["source"].split()[0] for p in held_out} == {"copy", "reverse"}
    samples = [encode_pair(tok, p["source"], p["target"], max_source=16, max_target=8) for p in train]
    cfg = dataclasses.replace(PRESETS["tiny"], d_model=128, n_head=8, vocab_size=tok.vocab_size,
                              max_position_embeddings=32, embedding_dropout=0.0, attention_dropout=0.0,
                              hidden_dropout=0.0)
    torch.manual_seed(0)
    model = GLMComposer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    dev_match = []
    for step in range(1, 801):                     # until dev exact match >= 0.975 (300-600 steps)
        for g in opt.param_groups:
            g["lr"] = 2e-3 * min(1.0, step / 20) * (1 - step / 800)        # warmup, linear decay
        idx = rng.choice(len(samples), size=32, replace=False)
        batch = {k: torch.as_tensor(v, dtype=torch.long)
                 for k, v in pad_batch([samples[i] for i in idx], pad_id=tok.specials.pad).items()}
        loss = model.loss(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 and step >= 200:
            dev_match.append(evaluate_generation(model.model, tok, dev, max_new_tokens=10, max_source=16)
                             ["exact_match"])
            if dev_match[-1] >= 0.975:
                break
    glm = model.model
    greedy = evaluate_generation(glm, tok, held_out, max_new_tokens=10, max_source=16)
    assert greedy["exact_match"] >= 0.9, (dev_match, list(zip(greedy["predictions"], greedy["references"])))
    assert greedy["rouge1"] >= 0.9 and greedy["references"] == [tok.decode(tok.encode(p["target"])) for p in held_out]
    # the predictions are fill_blanks' answers on [CLS] source [gMASK]
    ctx = source_context(tok.encode(held_out[0]["source"]), tok.specials, 16)
    assert greedy["predictions"][0] == tok.decode(fill_blanks(glm, ctx, tok.specials, "greedy", 10)[0])
    beam = evaluate_generation(glm, tok, held_out[:20], strategy="beam", num_beams=3, max_new_tokens=10,
                               max_source=16)
    assert beam["exact_match"] >= 0.9 and len(beam["predictions"]) == 20
    with pytest.raises(ValueError, match="pass the plain GLM"):
        evaluate_generation(model, tok, held_out[:1])
