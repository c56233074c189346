"""ZeRO checkpoints that zero_to_orbax must refuse: one line naming the file and what is wrong,
exit code 2, nothing at --save (spec/zero-shards.md §11). Each case writes zero_writer.py's DP=3
checkpoint of the micro model (tests/converters/test_zero_to_orbax.py has the good ones) and
breaks one thing in it.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import universal_writer as uw
import zero_writer as zw
from converters import zero, zero_files, zero_to_orbax

MICRO = uw.with_shape("zero_micro_shape_bad", L=2, H=8, NQ=4, NKV=2, F=24, V=100, VPAD=112,
                      SEQ=16)


def _rank(root: str, r: int, prefix: str = "") -> str:
    return os.path.join(root, f"global_step{uw.ITERATION}",
                        f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")


def _osd(top):
    return top["optimizer_state_dict"]


def _write(root, mutate=None, **kw):
    zw.write_zero_checkpoint(root, MICRO, 3, mutate=mutate, **kw)


def _missing_rank(root):
    _write(root)
    os.remove(_rank(root, 1))
    return ["DP rank file(s) [1] missing", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def _missing_last_rank(root):
    _write(root)
    os.remove(_rank(root, 2))
    return [_rank(root, 0), "partition_count [3, 3], but the folder has 2 DP rank files"]


def _truncated_rank(root):
    _write(root)
    data = open(_rank(root, 2), "rb").read()
    open(_rank(root, 2), "wb").write(data[:len(data) // 2])
    return [_rank(root, 2), "truncated"]


def _unreadable_rank(root):
    _write(root)
    with open(_rank(root, 1), "wb") as f:
        f.write(b"not a torch.save archive\n" * 40)
    return [_rank(root, 1), "not a torch.save zip archive", "damaged"]


def _rank_of_another_run(root):
    """Same model, DP and step, other weights: rank 1 copied from another run's save."""
    _write(root)
    other = root + "_other_run"
    _write(other, seed=7)
    shutil.copy(_rank(other, 1), _rank(root, 1))
    shutil.rmtree(other)
    return [_rank(root, 1), "differs from its module weight", "different saves"]


def _different_steps(root):
    def mutate(r, top):
        if r == 2:
            for st in _osd(top)["base_optimizer_state"]["state"].values():
                st["step"] = np.array(19.0, np.float32)
    _write(root, mutate)
    return [_rank(root, 2), "Adam step [19.0], but rank 0 has 20.0", "different saves"]


def _partition_count(root):
    def mutate(r, top):
        _osd(top)["partition_count"] = [4, 4]
    _write(root, mutate)
    return [_rank(root, 0), "partition_count [4, 4], but the folder has 3 DP rank files"]


def _model_config(root):
    _write(root)
    return ["mp_rank_00_model_states.pt", "param_shapes disagree with --model-config",
            "language_model.embedding.word_embeddings.weight is [112, 8]"]


def _tensor_parallel(root):
    _write(root)
    folder = os.path.join(root, f"global_step{uw.ITERATION}")
    shutil.copy(os.path.join(folder, "mp_rank_00_model_states.pt"),
                os.path.join(folder, "mp_rank_01_model_states.pt"))
    return [folder, "mp ranks [0, 1]", "TP = PP = 1"]


def _pipeline(root):
    _write(root)
    open(os.path.join(root, f"global_step{uw.ITERATION}", "layer_01-model_00-model_states.pt"),
         "wb").close()
    return ["layer_*-model_*-model_states.pt", "PP > 1"]


def _stage3(root):
    def mutate(r, top):
        _osd(top)["zero_stage"] = zw.ZeroStageEnum.weights
    _write(root, mutate)
    return [_rank(root, 0), "zero_stage 3"]


def _elastic(root):
    def mutate(r, top):
        base = _osd(top)["base_optimizer_state"]
        _osd(top)["base_optimizer_state"] = [base["state"][0], base["state"][1]]
    _write(root, mutate)
    return [_rank(root, 0), "elastic checkpoint"]


def _mapping(root):
    def mutate(r, top):
        if r == 1:
            m = _osd(top)["param_slice_mappings"][0]
            name = next(iter(m))
            m[name] = zw.fragment_address(numel=m[name].numel, start=m[name].start + 1)
    _write(root, mutate)
    return [_rank(root, 1), "group 0", "param_slice_mappings disagree with the param_shapes walk"]


def _short_fp32(root):
    def mutate(r, top):
        if r == 0:
            _osd(top)["single_partition_of_fp32_groups"][1] = np.zeros(3, np.float32)
    _write(root, mutate)
    return [_rank(root, 0), "group 1", "fp32 partition has 3 elements, fewer than the 14 real"]


def _moment_length(root):
    def mutate(r, top):
        if r == 1:
            st = _osd(top)["base_optimizer_state"]["state"][0]
            st["exp_avg_sq"] = st["exp_avg_sq"][:-2].copy()
    _write(root, mutate)
    return [_rank(root, 1), "exp_avg_sq has 1108 elements, the partition size S=1110"]


def _master_changed(root):  # found while streaming, after writing began
    def mutate(r, top):
        if r == 1:
            _osd(top)["single_partition_of_fp32_groups"][0][5] += 1.0
    _write(root, mutate)
    return [_rank(root, 1), "cast to float32 differs from its module weight"]


def _non_finite(root):
    def mutate(r, top):
        if r == 2:
            _osd(top)["base_optimizer_state"]["state"][0]["exp_avg"][0] = np.nan
    _write(root, mutate)
    return [_rank(root, 2), "exp_avg of", "non-finite"]


def _two_prefixes(root):
    _write(root)
    shutil.copy(_rank(root, 0), _rank(root, 0, "bf16_"))
    return ["several prefixes", "['', 'bf16_']"]


def _not_zero(root):
    os.makedirs(root)
    return [root, "not a DeepSpeed ZeRO checkpoint"]


BREAKERS = [_missing_rank, _missing_last_rank, _truncated_rank, _unreadable_rank,
            _different_steps, _rank_of_another_run,
            _partition_count, _model_config, _tensor_parallel, _pipeline, _stage3, _elastic,
            _mapping, _short_fp32, _moment_length, _master_changed, _non_finite, _two_prefixes,
            _not_zero]


@pytest.mark.parametrize("breaker", BREAKERS, ids=[b.__name__[1:] for b in BREAKERS])
def test_bad_input(tmp_path, capsys, breaker):
    root = str(tmp_path / "src")
    expected = breaker(root)
    dst = str(tmp_path / "out")
    argv = ["--load", root, "--save", dst]
    if breaker is _model_config:
        cfg = {"num_layers": 2, "hidden_size": 16, "num_heads": 4, "num_kv_heads": 2,
               "ffn_hidden_size": 24, "vocab_size": 100, "seq_length": 16,
               "make_vocab_size_divisible_by": 16}
        argv += ["--model-config", json.dumps(cfg)]
    capsys.readouterr()
    assert zero_to_orbax.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for part in expected:
        assert part in err, err
    assert os.listdir(tmp_path) == ["src"]


def test_group_paddings_disagreement_is_logged(tmp_path, caplog):
    """The 768 signature (old writer, P - N > S) is logged and otherwise ignored."""
    import logging

    root = str(tmp_path / "src")
    zw.write_zero_checkpoint(root, MICRO, 8, "zero_old")
    with caplog.at_level(logging.WARNING):
        ckpt = zero.open_zero(root)
    assert ckpt.writer == zero_files.WRITER_ZERO
    lines = [r.getMessage() for r in caplog.records if "group_paddings" in r.getMessage()]
    assert any("group 1" in m and "2 rank(s)" in m and "rank 7: 8 vs 6" in m for m in lines), \
        lines
