"""Megatron-DeepSpeed tensor names and the exact layout transforms to and from agpt-jax params.

Everything here is pure numpy and exact (reshapes, transposes, slices, zero padding: no
arithmetic), so universal -> agpt-jax -> universal is bit-exact.

Megatron stores linear weights as [out, in] and applies `y = x @ W.T` (spec §4.1); agpt-jax
stores kernels as [in, ...out] and stacks the L blocks on a leading axis. The per-tensor rules:

    word_embeddings.weight           [V, H]            -> embed/embedding [V_pad, H] (zero-padded)
    input_layernorm.weight           [H]               -> layers/attn_norm/scale [i]
    query_key_value.weight           [(nq+2nkv)*D, H]  -> layers/attn/{q,k,v} [i] (spec §4.2)
    self_attention.dense.weight      [H, nq*D]         -> layers/attn/o [i] [nq, D, H]
    post_attention_layernorm.weight  [H]               -> layers/mlp_norm/scale [i]
    dense_h_to_4h.weight             [2F, H]           -> layers/mlp/{gate,up} [i] (spec §4.3)
    dense_4h_to_h.weight             [H, F]            -> layers/mlp/down [i] [F, H]
    final_layernorm.weight           [H]               -> final_norm/scale
    output_layer.weight              [V, H]            -> lm_head/kernel [H, V_pad]

Two naming schemes exist (spec §3.5, §4.6): the non-pipeline module names
(`language_model.encoder.layers.{i}...`) and the DeepSpeed pipeline names
(`1.word_embeddings.weight`, `{2+i}....`, `{L+2}.weight`, `{L+3}.lm_head.weight`).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Iterator, Mapping

import numpy as np

from agpt_jax.model import GPTConfig

FlaxPath = tuple[str, ...]

# Flax parameter paths (plain tree after nn.unbox), see agpt_jax/model.py.
EMBED: FlaxPath = ("embed", "embedding")
ATTN_NORM: FlaxPath = ("layers", "attn_norm", "scale")
ATTN_Q: FlaxPath = ("layers", "attn", "q")
ATTN_K: FlaxPath = ("layers", "attn", "k")
ATTN_V: FlaxPath = ("layers", "attn", "v")
ATTN_O: FlaxPath = ("layers", "attn", "o")
MLP_NORM: FlaxPath = ("layers", "mlp_norm", "scale")
MLP_GATE: FlaxPath = ("layers", "mlp", "gate")
MLP_UP: FlaxPath = ("layers", "mlp", "up")
MLP_DOWN: FlaxPath = ("layers", "mlp", "down")
FINAL_NORM: FlaxPath = ("final_norm", "scale")
LM_HEAD: FlaxPath = ("lm_head", "kernel")

FLAX_PATHS: tuple[FlaxPath, ...] = (EMBED, ATTN_NORM, ATTN_Q, ATTN_K, ATTN_V, ATTN_O, MLP_NORM,
                                    MLP_GATE, MLP_UP, MLP_DOWN, FINAL_NORM, LM_HEAD)


class Kind(enum.Enum):
    """What a Megatron tensor is, independent of its name scheme."""

    EMBEDDING = "word_embeddings"
    INPUT_NORM = "input_layernorm"
    QKV = "query_key_value"
    DENSE = "dense"
    POST_NORM = "post_attention_layernorm"
    H_TO_4H = "dense_h_to_4h"
    FOURH_TO_H = "dense_4h_to_h"
    FINAL_NORM = "final_layernorm"
    OUTPUT = "output_layer"


class NameScheme(enum.Enum):
    """Megatron module names (--no-pipeline-parallel) or DeepSpeed PipelineModule names."""

    MODULE = "module"
    PIPELINE = "pipeline"


# Suffix of a layer tensor after `layers.{i}.` (module) or `{2+i}.` (pipeline).
_LAYER_SUFFIX: dict[Kind, str] = {
    Kind.INPUT_NORM: "input_layernorm.weight",
    Kind.QKV: "self_attention.query_key_value.weight",
    Kind.DENSE: "self_attention.dense.weight",
    Kind.POST_NORM: "post_attention_layernorm.weight",
    Kind.H_TO_4H: "mlp.dense_h_to_4h.weight",
    Kind.FOURH_TO_H: "mlp.dense_4h_to_h.weight",
}
_LAYER_KINDS = tuple(_LAYER_SUFFIX)


@dataclasses.dataclass(frozen=True)
class MegatronTensor:
    """One Megatron parameter: its name, kind, layer (None outside the blocks) and full shape.

    Attributes:
        name: the dotted parameter name (the `zero/<name>/` folder of a universal checkpoint).
        kind: what the tensor is.
        layer: block index 0..L-1, or None for embedding, final norm and output layer.
        shape: the full (unsharded) Megatron shape; vocabulary tensors have V_pad rows here.
    """

    name: str
    kind: Kind
    layer: int | None
    shape: tuple[int, ...]

    @property
    def is_vocab(self) -> bool:
        """Vocabulary tensors are stored in universal files without their padding rows."""
        return self.kind in (Kind.EMBEDDING, Kind.OUTPUT)

    @property
    def n_sub_params(self) -> int:
        """dense_h_to_4h holds [gate; up] and is marked `param_n_sub_params=2` (spec §3.4)."""
        return 2 if self.kind is Kind.H_TO_4H else 1


def tensor_name(kind: Kind, layer: int | None, num_layers: int, scheme: NameScheme) -> str:
    """The Megatron parameter name of a tensor in the given naming scheme (spec §3.5, §4.6)."""
    if scheme is NameScheme.MODULE:
        if kind in _LAYER_SUFFIX:
            return f"language_model.encoder.layers.{layer}.{_LAYER_SUFFIX[kind]}"
        return {
            Kind.EMBEDDING: "language_model.embedding.word_embeddings.weight",
            Kind.FINAL_NORM: "language_model.encoder.final_layernorm.weight",
            Kind.OUTPUT: "language_model.output_layer.weight",
        }[kind]
    if kind in _LAYER_SUFFIX:
        return f"{2 + layer}.{_LAYER_SUFFIX[kind]}"
    return {
        Kind.EMBEDDING: "1.word_embeddings.weight",
        Kind.FINAL_NORM: f"{num_layers + 2}.weight",
        Kind.OUTPUT: f"{num_layers + 3}.lm_head.weight",
    }[kind]


def megatron_shape(kind: Kind, config: GPTConfig) -> tuple[int, ...]:
    """The full Megatron shape of a tensor (vocabulary tensors with the padded vocab)."""
    h, f, d = config.hidden_size, config.ffn_hidden_size, config.head_dim
    nq, nkv = config.num_heads, config.num_kv_heads
    return {
        Kind.EMBEDDING: (config.padded_vocab_size, h),
        Kind.INPUT_NORM: (h,),
        Kind.QKV: ((nq + 2 * nkv) * d, h),
        Kind.DENSE: (h, nq * d),
        Kind.POST_NORM: (h,),
        Kind.H_TO_4H: (2 * f, h),
        Kind.FOURH_TO_H: (h, f),
        Kind.FINAL_NORM: (h,),
        Kind.OUTPUT: (config.padded_vocab_size, h),
    }[kind]


def megatron_tensors(config: GPTConfig, scheme: NameScheme) -> list[MegatronTensor]:
    """Every Megatron parameter of the model, in Megatron's `named_parameters()` order."""
    n = config.num_layers
    out = [MegatronTensor(tensor_name(Kind.EMBEDDING, None, n, scheme), Kind.EMBEDDING, None,
                          megatron_shape(Kind.EMBEDDING, config))]
    for i in range(n):
        for kind in _LAYER_KINDS:
            out.append(MegatronTensor(tensor_name(kind, i, n, scheme), kind, i,
                                      megatron_shape(kind, config)))
    for kind in (Kind.FINAL_NORM, Kind.OUTPUT):
        out.append(MegatronTensor(tensor_name(kind, None, n, scheme), kind, None,
                                  megatron_shape(kind, config)))
    return out


_PIPE_LAYER_RE = re.compile(
    r"^(\d+)\.(self_attention|mlp|input_layernorm|post_attention_layernorm)")
_MODULE_LAYER_RE = re.compile(r"^language_model\.encoder\.layers\.(\d+)\.")


def detect_scheme(names: set[str] | list[str], where: str) -> NameScheme:
    """Tell the naming scheme from the parameter names found in a checkpoint.

    Args:
        names: parameter names (e.g. the folders under `zero/`).
        where: the path the names came from, for the error message.

    Raises:
        ValueError: the names follow neither scheme.
    """
    names = set(names)
    if "language_model.embedding.word_embeddings.weight" in names or any(
            _MODULE_LAYER_RE.match(n) for n in names):
        return NameScheme.MODULE
    if "1.word_embeddings.weight" in names or any(_PIPE_LAYER_RE.match(n) for n in names):
        return NameScheme.PIPELINE
    sample = sorted(names)[:5]
    raise ValueError(f"{where}: parameter names {sample} follow neither Megatron's module names "
                     "(language_model.encoder.layers.N...) nor DeepSpeed's pipeline names "
                     "(1.word_embeddings.weight, N.self_attention...); is this a Megatron "
                     "GPT checkpoint?")


def count_layers(names: set[str] | list[str], scheme: NameScheme) -> int:
    """Number of transformer blocks implied by the parameter names (0 if none)."""
    indices = set()
    for n in names:
        m = (_MODULE_LAYER_RE if scheme is NameScheme.MODULE else _PIPE_LAYER_RE).match(n)
        if m:
            indices.add(int(m.group(1)) - (0 if scheme is NameScheme.MODULE else 2))
    return max(indices) + 1 if indices else 0


# ----------------------------------------------------------------------------------------------
# Megatron tensor -> slices of the agpt-jax params.


def pad_vocab_rows(w: np.ndarray, padded_rows: int) -> np.ndarray:
    """Zero-pad a [V, H] vocabulary tensor to [V_pad, H], as DeepSpeed does on a universal load.

    DeepSpeed's `load_hp_checkpoint_state` pads with `F.pad(..., (0, 0, 0, pad))`, i.e. zero rows
    at the end (spec §3.6).
    """
    if w.shape[0] > padded_rows:
        raise ValueError(f"vocabulary tensor has {w.shape[0]} rows, more than the padded "
                         f"vocabulary {padded_rows}")
    if w.shape[0] == padded_rows:
        return w
    out = np.zeros((padded_rows,) + w.shape[1:], w.dtype)
    out[: w.shape[0]] = w
    return out


# Tile edge of `transposed`: a 256 x 256 fp32 tile (256 KiB) and its transposed destination
# stay in the caches.
_TILE = 256


def transposed(w: np.ndarray) -> np.ndarray:
    """w.T of a 2-D array as a new C-contiguous array, copied tile by tile.

    `np.ascontiguousarray(w.T)` reads the source a whole row apart per element and falls out of
    the caches on large matrices; copying 256 x 256 tiles was 2.4x-3.3x faster on fp32 [2048,
    2048] to [32000, 2048] (34 against 83 ms for [5632, 2048], 165 against 551 ms for the
    embedding's [32000, 2048]) and the transposes were 8.4 of the 14.2 s a 0.3B conversion took.
    """
    m, n = w.shape
    out = np.empty((n, m), w.dtype)
    for i in range(0, m, _TILE):
        for j in range(0, n, _TILE):
            out[j:j + _TILE, i:i + _TILE] = w[i:i + _TILE, j:j + _TILE].T
    return out


def split_qkv(w: np.ndarray, config: GPTConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split Megatron's fused query_key_value weight into agpt-jax q, k, v kernels.

    The rows are grouped per kv head j as [q_{j*g}, ..., q_{j*g+g-1}, k_j, v_j] with g = nq / nkv
    (spec §4.2); query head h uses kv head h // g.

    Args:
        w: [(nq + 2 nkv) * D, H] float32.
        config: the model shape.

    Returns:
        q [H, nq, D], k [H, nkv, D], v [H, nkv, D].
    """
    h, d, nq, nkv = config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads
    g = nq // nkv
    grouped = w.reshape(nkv, g + 2, d, h)
    q = grouped[:, :g].reshape(nq, d, h)
    k = grouped[:, g]
    v = grouped[:, g + 1]
    # [n, D, H] -> [H, n, D]: one 2-D transpose of [n * D, H].
    return tuple(transposed(x.reshape(-1, h)).reshape(h, -1, d) for x in (q, k, v))


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, config: GPTConfig) -> np.ndarray:
    """Inverse of `split_qkv`: q [H, nq, D], k/v [H, nkv, D] -> [(nq + 2 nkv) * D, H]."""
    h, d, nq, nkv = config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads
    # [H, n, D] -> [n, D, H]: one 2-D transpose of [H, n * D].
    qr, kr, vr = (transposed(x.reshape(h, -1)).reshape(nkv, -1, d, h) for x in (q, k, v))
    return np.concatenate([qr, kr, vr], axis=1).reshape((nq + 2 * nkv) * d, h)


def to_flax(t: MegatronTensor, w: np.ndarray, config: GPTConfig) -> dict[FlaxPath, np.ndarray]:
    """Map one full Megatron tensor to the agpt-jax arrays (layer slices for block tensors).

    Args:
        t: which tensor.
        w: its value in Megatron layout, float32, with the padded vocabulary for vocab tensors.
        config: the model shape.

    Returns:
        Flax path -> array; for block tensors the array is the slice at index `t.layer` of the
        stacked [L, ...] param.
    """
    h, d, nq, f = config.hidden_size, config.head_dim, config.num_heads, config.ffn_hidden_size
    if t.kind is Kind.EMBEDDING:
        return {EMBED: w}
    if t.kind is Kind.OUTPUT:
        return {LM_HEAD: transposed(w)}
    if t.kind is Kind.FINAL_NORM:
        return {FINAL_NORM: w}
    if t.kind is Kind.INPUT_NORM:
        return {ATTN_NORM: w}
    if t.kind is Kind.POST_NORM:
        return {MLP_NORM: w}
    if t.kind is Kind.QKV:
        q, k, v = split_qkv(w, config)
        return {ATTN_Q: q, ATTN_K: k, ATTN_V: v}
    if t.kind is Kind.DENSE:
        # [H, nq*D] -> [nq*D, H] -> [nq, D, H]
        return {ATTN_O: transposed(w).reshape(nq, d, h)}
    if t.kind is Kind.H_TO_4H:
        # Rows [0, F) are the gate (silu applied), rows [F, 2F) are up (spec §4.3).
        return {MLP_GATE: transposed(w[:f]), MLP_UP: transposed(w[f:])}
    if t.kind is Kind.FOURH_TO_H:
        return {MLP_DOWN: transposed(w)}
    raise AssertionError(t.kind)


def to_flax_rows(t: MegatronTensor, w: np.ndarray, config: GPTConfig,
                 rows: int) -> Iterator[tuple[FlaxPath, int, np.ndarray]]:
    """`to_flax` as (path, first row, rows) blocks. The output layer's kernel, the transpose of
    a vocabulary-sized tensor and the largest array of most models, comes `rows` rows at a time,
    each block transposed on its own, so its whole transposed copy never exists; every other
    tensor comes whole (first row 0)."""
    if t.kind is Kind.OUTPUT:
        for h0 in range(0, w.shape[1], max(1, rows)):
            yield LM_HEAD, h0, transposed(w[:, h0:h0 + rows])
        return
    for path, part in to_flax(t, w, config).items():
        yield path, 0, part


def from_flax(t: MegatronTensor, parts: Mapping[FlaxPath, np.ndarray],
              config: GPTConfig) -> np.ndarray:
    """Inverse of `to_flax`: the agpt-jax arrays (layer slices) -> the full Megatron tensor.

    Vocabulary tensors come back with the padded vocabulary ([V_pad, H]); the universal writer
    strips the padding rows.
    """
    h, d, nq = config.hidden_size, config.head_dim, config.num_heads
    if t.kind is Kind.EMBEDDING:
        return parts[EMBED]
    if t.kind is Kind.OUTPUT:
        return transposed(parts[LM_HEAD])
    if t.kind is Kind.FINAL_NORM:
        return parts[FINAL_NORM]
    if t.kind is Kind.INPUT_NORM:
        return parts[ATTN_NORM]
    if t.kind is Kind.POST_NORM:
        return parts[MLP_NORM]
    if t.kind is Kind.QKV:
        return fuse_qkv(parts[ATTN_Q], parts[ATTN_K], parts[ATTN_V], config)
    if t.kind is Kind.DENSE:
        return transposed(parts[ATTN_O].reshape(nq * d, h))
    if t.kind is Kind.H_TO_4H:
        return np.concatenate([transposed(parts[MLP_GATE]), transposed(parts[MLP_UP])], axis=0)
    if t.kind is Kind.FOURH_TO_H:
        return transposed(parts[MLP_DOWN])
    raise AssertionError(t.kind)


def flax_paths_of(kind: Kind) -> tuple[FlaxPath, ...]:
    """The agpt-jax params a Megatron tensor of this kind feeds."""
    return {
        Kind.EMBEDDING: (EMBED,), Kind.OUTPUT: (LM_HEAD,), Kind.FINAL_NORM: (FINAL_NORM,),
        Kind.INPUT_NORM: (ATTN_NORM,), Kind.POST_NORM: (MLP_NORM,),
        Kind.QKV: (ATTN_Q, ATTN_K, ATTN_V), Kind.DENSE: (ATTN_O,),
        Kind.H_TO_4H: (MLP_GATE, MLP_UP), Kind.FOURH_TO_H: (MLP_DOWN,),
    }[kind]


def flax_shapes(config: GPTConfig) -> dict[FlaxPath, tuple[int, ...]]:
    """Shapes of the plain agpt-jax params tree (see agpt_jax/model.py), stacked layers first."""
    L, h, f, d = config.num_layers, config.hidden_size, config.ffn_hidden_size, config.head_dim
    nq, nkv, v = config.num_heads, config.num_kv_heads, config.padded_vocab_size
    return {
        EMBED: (v, h), ATTN_NORM: (L, h), ATTN_Q: (L, h, nq, d), ATTN_K: (L, h, nkv, d),
        ATTN_V: (L, h, nkv, d), ATTN_O: (L, nq, d, h), MLP_NORM: (L, h), MLP_GATE: (L, h, f),
        MLP_UP: (L, h, f), MLP_DOWN: (L, f, h), FINAL_NORM: (h,), LM_HEAD: (h, v),
    }


def is_stacked(path: FlaxPath) -> bool:
    """Params under `layers/` carry the leading [L] axis."""
    return path[0] == "layers"



def megatron_model_args(config: GPTConfig) -> dict[str, object]:
    """The Megatron-DeepSpeed args (names of megatron/arguments.py) that define the model's shape.

    `universal.config_from_args` reads these back; a universal checkpoint written without them
    cannot be loaded by Megatron or converted again, so the writer always derives them from the
    model instead of trusting whatever a checkpoint's metadata recorded (spec §1.4-1.5).
    """
    return {
        "num_layers": config.num_layers, "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "kv_channels": config.head_dim, "ffn_hidden_size": config.ffn_hidden_size,
        "seq_length": config.seq_length, "padded_vocab_size": config.padded_vocab_size,
        "make_vocab_size_divisible_by": config.make_vocab_size_divisible_by,
        "rope_theta": config.rope_theta, "layernorm_epsilon": config.norm_eps,
        "swiglu": True, "normalization": "rmsnorm", "untie_embeddings_and_output_weights": True,
        "add_bias_linear": False, "use_rotary_position_embeddings": True,
    }
