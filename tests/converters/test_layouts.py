"""The layout functions of converters/megatron_layout.py on matrices of more than two 256 tiles.

`megatron_layout.transposed` copies 256 x 256 tiles, and every other converter fixture has
dimensions <= 256, so a tile loop that stops early or drops the ragged last tile would pass them.
Here every matrix has > 2 tiles along each tiled axis and a size that is not a multiple of 256
(hidden 800 = 3*256 + 32, ffn 805 = 3*256 + 37, vocab 805 -> 816), filled with random data so
that a wrong index shows. Each function is compared with a plain numpy reference written from
the spec (../shared/spec/megatron-deepspeed.md §4.1-4.3, §3.5-3.6), and each split/fuse and
pad/unpad pair must round-trip bit-exactly.

The last test converts a universal checkpoint of that width, written by the independent writer
of universal_writer.py, to Orbax and back (the memory-mapped, one-tensor-at-a-time path of the
converters, with the in-flight cap forcing a wait after every write) and requires every universal
file to come back bit-exact.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from agpt_jax import checkpoint
from agpt_jax.model import GPTConfig
from converters import megatron_layout
from converters import orbax_to_universal, pt_archive, universal_to_orbax
from converters import universal
from universal_writer import with_shape

TILE = 256
HEAD_DIM = 8
NUM_HEADS = 100  # hidden = 100 * 8 = 800 = 3 * 256 + 32
HIDDEN = NUM_HEADS * HEAD_DIM
FFN = 3 * TILE + 37  # 805
VOCAB = 3 * TILE + 37  # 805, padded to 816 (multiple of 16)


def _config(num_kv_heads: int, **kw) -> GPTConfig:
    fields = dict(num_layers=1, hidden_size=HIDDEN, num_heads=NUM_HEADS,
                  num_kv_heads=num_kv_heads, ffn_hidden_size=FFN, vocab_size=VOCAB,
                  make_vocab_size_divisible_by=16, seq_length=16)
    fields.update(kw)
    return GPTConfig(**fields)


def _random(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def test_fixture_dimensions_span_more_than_two_ragged_tiles():
    """The sizes used below really exercise the tile loop: > 2 tiles, ragged last tile."""
    for n in (HIDDEN, FFN, VOCAB, _config(25).padded_vocab_size, (NUM_HEADS + 2 * 25) * HEAD_DIM):
        assert n > 2 * TILE and n % TILE, n
    assert megatron_layout._TILE == TILE


# ----------------------------------------------------------------------------------------------
# transposed


@pytest.mark.parametrize("shape", [(805, 805), (805, 300), (37, 805), (805, 1), (1, 805),
                                   (2 * TILE, 3 * TILE), (1610, 800)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_transposed_equals_numpy_transpose(shape, dtype):
    """transposed(w) == np.transpose(w) element for element, C-contiguous, same dtype."""
    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape) * 1000).astype(dtype)
    out = megatron_layout.transposed(w)
    assert out.shape == shape[::-1] and out.dtype == w.dtype and out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.transpose(w))
    np.testing.assert_array_equal(megatron_layout.transposed(out), w)


def test_transposed_of_a_strided_view():
    """A non-contiguous source (a column slice of a wider matrix) transposes like numpy's."""
    w = _random(np.random.default_rng(1), 900, 1700)[:, 3:1700:2]
    assert not w.flags.c_contiguous
    np.testing.assert_array_equal(megatron_layout.transposed(w), w.T)


# ----------------------------------------------------------------------------------------------
# Fused QKV (spec §4.2)


def _reference_split_qkv(w: np.ndarray, nq: int, nkv: int, d: int):
    """q [H, nq, D], k/v [H, nkv, D] by explicit row arithmetic.

    Follows spec §4.2, "So the weight rows are, for each kv group j ... (block of (g+2)·hd rows):
    [q_{j·g+0}, …, q_{j·g+g-1}] (g·hd rows), then k_j (hd rows), then v_j (hd rows)", and §4.1
    (weights are [out, in], so the agpt-jax [in, out] kernel is the transpose of those rows).
    """
    g = nq // nkv
    h = w.shape[1]
    q = np.empty((h, nq, d), w.dtype)
    k = np.empty((h, nkv, d), w.dtype)
    v = np.empty((h, nkv, d), w.dtype)
    for j in range(nkv):
        block = j * (g + 2) * d  # first row of kv group j
        for m in range(g):
            q[:, j * g + m, :] = w[block + m * d: block + (m + 1) * d, :].T
        k[:, j, :] = w[block + g * d: block + (g + 1) * d, :].T
        v[:, j, :] = w[block + (g + 1) * d: block + (g + 2) * d, :].T
    return q, k, v


@pytest.mark.parametrize("g", [1, 2, 4])
def test_split_qkv_matches_spec_row_groups(g):
    """split_qkv == the §4.2 row arithmetic; fuse_qkv(split_qkv(w)) == w bit-exactly."""
    nkv = NUM_HEADS // g
    cfg = _config(nkv)
    rows = (NUM_HEADS + 2 * nkv) * HEAD_DIM  # 2400, 1600, 1200
    assert megatron_layout.megatron_shape(megatron_layout.Kind.QKV, cfg) == (rows, HIDDEN)
    w = _random(np.random.default_rng(g), rows, HIDDEN)
    q, k, v = megatron_layout.split_qkv(w, cfg)
    rq, rk, rv = _reference_split_qkv(w, NUM_HEADS, nkv, HEAD_DIM)
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(k, rk)
    np.testing.assert_array_equal(v, rv)
    np.testing.assert_array_equal(megatron_layout.fuse_qkv(q, k, v, cfg), w)


@pytest.mark.parametrize("g", [1, 2, 4])
def test_fuse_qkv_then_split_is_identity(g):
    """split_qkv(fuse_qkv(q, k, v)) == (q, k, v), and the fused rows are §4.2's groups."""
    nkv = NUM_HEADS // g
    cfg = _config(nkv)
    rng = np.random.default_rng(10 + g)
    q, k, v = (_random(rng, HIDDEN, n, HEAD_DIM) for n in (NUM_HEADS, nkv, nkv))
    fused = megatron_layout.fuse_qkv(q, k, v, cfg)
    assert fused.shape == ((NUM_HEADS + 2 * nkv) * HEAD_DIM, HIDDEN)
    # Query head h sits in kv group h // g (spec §4.2: "Query head h uses kv head h // g").
    d, block = HEAD_DIM, (g + 2) * HEAD_DIM
    for h in (0, g - 1, g, NUM_HEADS - 1, 37):
        j, m = divmod(h, g)
        np.testing.assert_array_equal(fused[j * block + m * d: j * block + (m + 1) * d], q[:, h].T)
    for j in (0, nkv // 2, nkv - 1):
        np.testing.assert_array_equal(fused[j * block + g * d: j * block + (g + 1) * d], k[:, j].T)
        np.testing.assert_array_equal(fused[j * block + (g + 1) * d: (j + 1) * block], v[:, j].T)
    for got, want in zip(megatron_layout.split_qkv(fused, cfg), (q, k, v)):
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------
# Every tensor kind through to_flax / from_flax (spec §4.1, §4.3)


def _reference_to_flax(kind: megatron_layout.Kind, w: np.ndarray, cfg: GPTConfig) -> dict:
    """agpt-jax arrays of one Megatron tensor by spec §4.1 (y = x @ W.T, W [out, in]) and §4.3
    ("rows 0..F-1 of dense_h_to_4h are the gate (silu applied) and rows F..2F-1 are up")."""
    f, d, nq, h = cfg.ffn_hidden_size, cfg.head_dim, cfg.num_heads, cfg.hidden_size
    if kind is megatron_layout.Kind.QKV:
        q, k, v = _reference_split_qkv(w, nq, cfg.num_kv_heads, d)
        return {megatron_layout.ATTN_Q: q, megatron_layout.ATTN_K: k, megatron_layout.ATTN_V: v}
    if kind is megatron_layout.Kind.H_TO_4H:
        return {megatron_layout.MLP_GATE: np.transpose(w[:f]),
                megatron_layout.MLP_UP: np.transpose(w[f:2 * f])}
    if kind is megatron_layout.Kind.DENSE:
        # o[head, e, x] = W[x, head * D + e]: the input columns of o_proj are head-major.
        o = np.empty((nq, d, h), w.dtype)
        for head in range(nq):
            o[head] = w[:, head * d:(head + 1) * d].T
        return {megatron_layout.ATTN_O: o}
    if kind is megatron_layout.Kind.FOURH_TO_H:
        return {megatron_layout.MLP_DOWN: np.transpose(w)}
    if kind is megatron_layout.Kind.OUTPUT:
        return {megatron_layout.LM_HEAD: np.transpose(w)}
    # embedding ([V_pad, H] rows are tokens) and norms
    return {megatron_layout.flax_paths_of(kind)[0]: w}


@pytest.mark.parametrize("g", [1, 4])
def test_every_kind_to_flax_matches_reference_and_round_trips(g):
    """to_flax == the numpy reference for every Megatron tensor kind; from_flax inverts it."""
    cfg = _config(NUM_HEADS // g)
    rng = np.random.default_rng(100 + g)
    shapes = megatron_layout.flax_shapes(cfg)
    for t in megatron_layout.megatron_tensors(cfg, megatron_layout.NameScheme.MODULE):
        w = _random(rng, *t.shape)
        parts = megatron_layout.to_flax(t, w, cfg)
        want = _reference_to_flax(t.kind, w, cfg)
        assert set(parts) == set(want) == set(megatron_layout.flax_paths_of(t.kind)), t.name
        for path, value in parts.items():
            full = shapes[path]
            assert value.shape == (full[1:] if megatron_layout.is_stacked(path)
                                   else full), (t.name, path)
            np.testing.assert_array_equal(value, want[path], err_msg=f"{t.name} -> {path}")
        back = megatron_layout.from_flax(t, parts, cfg)
        assert back.shape == t.shape and back.dtype == np.float32
        np.testing.assert_array_equal(back, w, err_msg=t.name)


# ----------------------------------------------------------------------------------------------
# Vocabulary padding (spec §3.5-3.6)


def test_pad_vocab_rows_appends_zero_rows_and_unpads():
    """pad_vocab_rows == np.pad with zero rows at the end (DeepSpeed's F.pad(..., (0,0,0,pad)));
    the universal writer's unpad keeps the first original_vocab_size rows (spec §3.5)."""
    cfg = _config(25)
    vpad = cfg.padded_vocab_size
    assert vpad == 816
    w = _random(np.random.default_rng(7), VOCAB, HIDDEN)
    padded = megatron_layout.pad_vocab_rows(w, vpad)
    np.testing.assert_array_equal(padded, np.pad(w, ((0, vpad - VOCAB), (0, 0))))
    assert padded.dtype == w.dtype
    assert megatron_layout.pad_vocab_rows(padded, vpad) is padded  # already padded: unchanged
    with pytest.raises(ValueError, match="more than the padded"):
        megatron_layout.pad_vocab_rows(padded, vpad - 1)
    for kind in (megatron_layout.Kind.EMBEDDING, megatron_layout.Kind.OUTPUT):
        t = next(t for t in megatron_layout.megatron_tensors(cfg, megatron_layout.NameScheme.MODULE)
                 if t.kind is kind)
        state = orbax_to_universal._state_dict_for(t, padded, cfg)
        assert state["vocab_tensor"] is True and state["cat_dim"] == 0
        np.testing.assert_array_equal(state["param"], w)
        # ... and the reader pads it back to V_pad.
        np.testing.assert_array_equal(universal.validate_state_dict(state, t, cfg, "x"), padded)


def test_output_layer_transpose_keeps_padded_columns_zero():
    """lm_head [H, V_pad] of a padded output_layer is its transpose: columns >= V are zero."""
    cfg = _config(25)
    t = next(t for t in megatron_layout.megatron_tensors(cfg, megatron_layout.NameScheme.PIPELINE)
             if t.kind is megatron_layout.Kind.OUTPUT)
    w = megatron_layout.pad_vocab_rows(_random(np.random.default_rng(8), VOCAB, HIDDEN),
                                       cfg.padded_vocab_size)
    head = megatron_layout.to_flax(t, w, cfg)[megatron_layout.LM_HEAD]
    np.testing.assert_array_equal(head, w.T)
    assert not head[:, VOCAB:].any() and head[:, :VOCAB].all()


# ----------------------------------------------------------------------------------------------
# universal -> Orbax -> universal on a model wider than two tiles (needs torch to write)


WIDE = dict(L=1, H=HIDDEN, NQ=40, NKV=10, F=FFN, V=VOCAB, VPAD=816, SEQ=16)  # D = 20, g = 4


@pytest.mark.torch
def test_wide_universal_round_trip_is_bit_exact(tmp_path):
    """universal -> Orbax -> universal on hidden 800, ffn 805, vocab 805 (816): every fp32 /
    exp_avg / exp_avg_sq file comes back bit-exact, and the Orbax kernels equal numpy's
    transposes of the writer's Megatron tensors (spec §4.1-4.3)."""
    wr = with_shape("_universal_writer_wide", **WIDE)
    src = str(tmp_path / "src")
    fx = wr.write_universal_fixture(src, seed=5)
    meg, moments = fx["megatron"], fx["moments"]

    orbax = str(tmp_path / "orbax")
    # A 1-byte in-flight cap waits for every write before the next tensor is read.
    universal_to_orbax.convert(src, orbax, universal_to_orbax.ConvertOptions(
        max_inflight_bytes=1, progress=False))
    cfg = checkpoint.model_config(orbax)
    assert (cfg.hidden_size, cfg.ffn_hidden_size, cfg.padded_vocab_size) == (HIDDEN, FFN, 816)

    params = checkpoint.PyTreeItemReader(os.path.join(orbax, checkpoint.ITEM_PARAMS))
    adam = checkpoint.PyTreeItemReader(os.path.join(orbax, checkpoint.ITEM_ADAM))
    pre = "language_model.encoder.layers.0."
    np.testing.assert_array_equal(params.read(megatron_layout.MLP_DOWN, 0),
                                  np.transpose(meg[pre + "mlp.dense_4h_to_h.weight"]))
    h_to_4h = meg[pre + "mlp.dense_h_to_4h.weight"]
    np.testing.assert_array_equal(params.read(megatron_layout.MLP_GATE, 0),
                                  np.transpose(h_to_4h[:FFN]))
    np.testing.assert_array_equal(params.read(megatron_layout.MLP_UP, 0),
                                  np.transpose(h_to_4h[FFN:]))
    np.testing.assert_array_equal(
        adam.read(("nu",) + megatron_layout.ATTN_O, 0),
        np.transpose(moments[pre + "self_attention.dense.weight"][1]).reshape(40, 20, HIDDEN))
    head = params.read(megatron_layout.LM_HEAD)
    np.testing.assert_array_equal(head[:, :VOCAB], np.transpose(
        meg["language_model.output_layer.weight"]))
    assert not head[:, VOCAB:].any()
    q = params.read(megatron_layout.ATTN_Q, 0)
    np.testing.assert_array_equal(q, fx["hf"]["model.layers.0.self_attn.q_proj.weight"].T
                                  .reshape(HIDDEN, 40, 20))

    back = str(tmp_path / "back")
    orbax_to_universal.convert(orbax, back, progress=False)
    folder = universal.resolve_universal_dir(back)
    assert sorted(os.listdir(os.path.join(folder, universal.ZERO))) == sorted(
        list(meg) + [universal.OPTIMIZER_STATE])
    for name, w in meg.items():
        m, v = moments[name]
        for state, want in (("fp32", w), ("exp_avg", m), ("exp_avg_sq", v)):
            got = pt_archive.load(os.path.join(folder, universal.ZERO, name,
                                               f"{state}.pt"))["param"]
            assert got.dtype == np.float32 and got.shape == want.shape, (name, state)
            np.testing.assert_array_equal(got, want, err_msg=f"{name}/{state}")
