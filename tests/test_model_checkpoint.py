"""model/checkpoint.py: official release, hub and Composer layouts, export round trip, readable errors.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_model_checkpoint.py
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch

from model.checkpoint import UnsafeCheckpointError, load_checkpoint, read_state_dict, read_trainer_state, save_hub
from model.config import GLMConfig
from model.glm import GLM


def assert_official_logits(model: GLM, tv: dict) -> None:
    with torch.no_grad():
        logits = model.eval()(tv["input_ids"], tv["position_ids"], sep=tv["sep"])
    torch.testing.assert_close(logits, tv["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tracker,iteration", [("latest_checkpointed_iteration.txt", "release"), ("latest", "2000")])
def test_official_release_layout(tv, tmp_path, tracker, iteration):
    (tmp_path / tracker).write_text(iteration + "\n")
    (tmp_path / iteration).mkdir()
    torch.save({"module": tv["state_dict"], "iteration": 2000}, tmp_path / iteration / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match="config"):
        load_checkpoint(tmp_path)  # the release has no config.json
    assert_official_logits(load_checkpoint(tmp_path, tv["config"]), tv)
    assert_official_logits(load_checkpoint(str(tmp_path), GLMConfig.from_hub(tv["config"])), tv)


def test_release_layout_errors(tmp_path):
    (tmp_path / "latest").write_text("7")
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt"):
        read_state_dict(tmp_path)
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "mp_rank_01_model_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="change_mp.py"):
        read_state_dict(tmp_path)
    with pytest.raises(ValueError, match="neither an official release folder"):
        read_state_dict(tmp_path / "7")
    with pytest.raises(ValueError, match="does not exist"):
        read_state_dict(tmp_path / "nope")


def test_hub_export_then_load_round_trips(tv, tmp_path):
    model = load_checkpoint(tv["state_dict"], tv["config"])
    save_hub(model, tmp_path / "hub")
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["config.json", "pytorch_model.bin"]
    hub = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert {k: hub[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                                "max_sequence_length", "block_position_encoding")} == \
        {k: tv["config"][k] for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                                      "max_sequence_length", "block_position_encoding")}
    loaded = load_checkpoint(tmp_path / "hub")
    assert loaded.config == model.config
    assert_official_logits(loaded, tv)
    assert_official_logits(load_checkpoint(tmp_path / "hub" / "pytorch_model.bin"), tv)  # config.json beside it
    saved = torch.load(tmp_path / "hub" / "pytorch_model.bin", weights_only=True)
    assert sorted(saved) == sorted(tv["state_dict"])


def test_hub_layout_with_glm_prefix_and_fp16(tv, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tv["config"]))
    torch.save({"glm." + k: v.half() for k, v in tv["state_dict"].items()}, tmp_path / "pytorch_model.bin")
    model = load_checkpoint(tmp_path)
    assert model.word_embeddings.weight.dtype == torch.float32
    half = load_checkpoint(tmp_path, dtype=None)
    assert half.word_embeddings.weight.dtype == torch.float16


def test_composer_checkpoint_with_preset_config(tv, tmp_path):
    """Our trainer's Composer file: state['model'] keys prefixed `model.`, plus rng / timestamp data."""
    state = {"state": {"model": {"model." + k: v for k, v in tv["state_dict"].items()},
                       "timestamp": {"total_wct": datetime.timedelta(seconds=3)}, "run_name": "x"},
             "rng": [{"numpy": np.random.RandomState(0).get_state(), "torch": torch.get_rng_state()}]}
    torch.save(state, tmp_path / "ep0-ba10-rank0.pt")
    # preset "tiny" gives head_dim 16 and the dropouts; every shape comes from the weights
    model = load_checkpoint(tmp_path / "ep0-ba10-rank0.pt", "tiny")
    assert (model.config.n_layer, model.config.d_model, model.config.n_head) == (2, 64, 4)
    assert (model.config.vocab_size, model.config.max_position_embeddings) == (211, 32)
    assert_official_logits(model, tv)


def test_missing_and_unexpected_keys_are_listed(tv):
    sd = dict(tv["state_dict"])
    del sd["transformer.layers.1.mlp.dense_4h_to_h.bias"]
    sd["transformer.layers.2.attention.dense.weight"] = torch.zeros(64, 64)
    with pytest.raises(ValueError) as err:
        load_checkpoint(sd, tv["config"])
    msg = str(err.value)
    assert "missing keys (1): transformer.layers.1.mlp.dense_4h_to_h.bias" in msg
    assert "unexpected keys (1): transformer.layers.2.attention.dense.weight" in msg


def test_shape_mismatch_is_named(tv):
    wrong = dict(tv["config"], vocab_size=300)
    with pytest.raises(ValueError, match=r"word_embeddings.weight: checkpoint \(211, 64\) vs model \(300, 64\)"):
        load_checkpoint(tv["state_dict"], wrong)
    no_block = dict(tv["config"], block_position_encoding=False)
    with pytest.raises(ValueError, match="unexpected keys.*block_position_embeddings"):
        load_checkpoint(tv["state_dict"], no_block)


def test_non_tensor_entries_and_bad_config(tv, tmp_path):
    with pytest.raises(ValueError, match="not a tensor"):
        load_checkpoint({"word_embeddings.weight": [1, 2]}, tv["config"])
    with pytest.raises(ValueError, match="neither a preset"):
        load_checkpoint(tv["state_dict"], str(tmp_path / "missing.json"))


def test_safetensors(tv, tmp_path):
    model = load_checkpoint(tv["state_dict"], tv["config"])
    if importlib.util.find_spec("safetensors") is None:
        (tmp_path / "config.json").write_text(json.dumps(tv["config"]))
        (tmp_path / "model.safetensors").write_bytes(b"\0" * 8)
        with pytest.raises(ValueError, match="safetensors"):
            load_checkpoint(tmp_path)
        with pytest.raises(ValueError, match="pip install safetensors"):
            save_hub(model, tmp_path / "out", safetensors=True)
    else:
        save_hub(model, tmp_path / "out", safetensors=True)
        assert_official_logits(load_checkpoint(tmp_path / "out"), tv)


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def test_planted_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"model": {"word_embeddings.weight": _Planted(marker)}}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"evil.pt.*GLOBAL exec .*could run arbitrary code"):
        read_state_dict(tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="GLOBAL exec"):
        read_trainer_state(tmp_path / "evil.pt", "state.timestamp")
    assert not marker.exists()


def _sharded(tmp_path, model: GLM):
    """A Composer-layout sharded checkpoint (state.model with `model.` keys, plus plain data) written by DCP."""
    import torch.distributed.checkpoint as dcp

    state = {"state": {"model": {"model." + k: v for k, v in model.state_dict().items()},
                       "timestamp": {"Timestamp": {"batch": 8, "total_wct": datetime.timedelta(seconds=2)}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(tmp_path / "ep0-ba8"))
    return tmp_path / "ep0-ba8"


def test_sharded_checkpoint_reads_in_one_process(tmp_path):
    from model.config import PRESETS

    model = GLM(PRESETS["tiny"])
    folder = _sharded(tmp_path, model)
    state_dict, _ = read_state_dict(folder)
    assert state_dict.keys() == model.state_dict().keys()
    assert all(torch.equal(state_dict[k], v) for k, v in model.state_dict().items())
    assert read_trainer_state(folder, "state.timestamp.Timestamp")["state"]["timestamp"]["Timestamp"]["batch"] == 8
    data = next(folder.glob("*.distcp"))
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 10)
    with pytest.raises(ValueError, match=rf"{data.name} has \d+ bytes, \d+ needed \(truncated\)"):
        read_trainer_state(folder, "state.timestamp")


@pytest.mark.parametrize("keep", [0, 1, 3, 4, 200])
def test_checkpoint_cut_short_is_unreadable_not_a_crash(tmp_path, keep):
    """A SIGKILL while a checkpoint is written can leave it empty or cut anywhere: autoresume must see 'cannot be
    read' (and fall back), never an exception of its own (an empty EOFError once became an IndexError here), and
    never mistake a zip cut in its first bytes for a planted pickle."""
    full = tmp_path / "full.pt"
    torch.save({"state": {"timestamp": {"Timestamp": {"batch": 8}}}}, full)
    cut = tmp_path / "ep0-ba8-rank0.pt"
    cut.write_bytes(full.read_bytes()[:keep])
    with pytest.raises(ValueError, match=r"ep0-ba8-rank0.pt' cannot be read: \S"):
        read_trainer_state(cut, "state.timestamp")
    with pytest.raises(ValueError, match=r"ep0-ba8-rank0.pt' cannot be read: \S"):   # fill_blanks, evaluate
        read_state_dict(cut)
