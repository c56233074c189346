"""agpt-jax Orbax checkpoint -> Hugging Face Llama folder (config.json + safetensors shards).

    python -m converters.orbax_to_hf --load SRC --save DST [--tokenizer PATH] [--dtype bfloat16]

The mapping is the one of Megatron-DeepSpeed's mds_to_hf.py (spec §4.7): q/k/v/o, gate/up/down and
the norms map one to one (rotary is rotate-half in both, so no permutation, spec §4.4); the
vocabulary is the padded one (`vocab_size = padded_vocab_size`), as mds_to_hf.py writes it.
`transformers.LlamaForCausalLM.from_pretrained(DST)` computes agpt-jax's logits.

Tensors are written per layer into shards of at most `--max-shard-gb`, so memory stays at one shard.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterator, Sequence

import numpy as np
from absl import flags

from agpt_jax import checkpoint, cli
from agpt_jax.model import GPTConfig
from converters import megatron_layout
from converters import ConversionError, run_cli, write_atomically

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "added_tokens.json")


def hf_config(config: GPTConfig, dtype: str) -> dict[str, Any]:
    """config.json of the equivalent LlamaForCausalLM.

    Written by the installed transformers' LlamaConfig; `rope_theta` and `torch_dtype` are also
    kept at the top level, where transformers 4.x (and tools built on it) read them.
    """
    from transformers import LlamaConfig

    out = LlamaConfig(
        vocab_size=config.padded_vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.seq_length,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        torch_dtype=dtype,
        architectures=["LlamaForCausalLM"],
    ).to_dict()
    out.setdefault("rope_theta", config.rope_theta)
    out.setdefault("torch_dtype", dtype)
    return out


def hf_tensors(reader: checkpoint.PyTreeItemReader,
               config: GPTConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, [out, in] weight) pairs, one layer at a time (HF Linear layout is Megatron's)."""
    h, d, nq, nkv = config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads
    yield "model.embed_tokens.weight", reader.read(megatron_layout.EMBED)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        q = reader.read(megatron_layout.ATTN_Q, i)  # [H, nq, D]
        yield p + "self_attn.q_proj.weight", q.reshape(h, nq * d).T
        yield (p + "self_attn.k_proj.weight",
               reader.read(megatron_layout.ATTN_K, i).reshape(h, nkv * d).T)
        yield (p + "self_attn.v_proj.weight",
               reader.read(megatron_layout.ATTN_V, i).reshape(h, nkv * d).T)
        yield (p + "self_attn.o_proj.weight",
               reader.read(megatron_layout.ATTN_O, i).reshape(nq * d, h).T)
        yield p + "mlp.gate_proj.weight", reader.read(megatron_layout.MLP_GATE, i).T
        yield p + "mlp.up_proj.weight", reader.read(megatron_layout.MLP_UP, i).T
        yield p + "mlp.down_proj.weight", reader.read(megatron_layout.MLP_DOWN, i).T
        yield p + "input_layernorm.weight", reader.read(megatron_layout.ATTN_NORM, i)
        yield p + "post_attention_layernorm.weight", reader.read(megatron_layout.MLP_NORM, i)
    yield "model.norm.weight", reader.read(megatron_layout.FINAL_NORM)
    yield "lm_head.weight", reader.read(megatron_layout.LM_HEAD).T


def _copy_tokenizer(path: str, dst: str) -> None:
    """Copy HF tokenizer files from a folder, or wrap a sentencepiece .model as LlamaTokenizer."""
    if os.path.isdir(path):
        found = [n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise ConversionError(f"{path}: --tokenizer folder holds none of {_TOKENIZER_FILES}")
        for n in found:
            shutil.copy(os.path.join(path, n), os.path.join(dst, n))
        return
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: --tokenizer does not exist")
    if not path.endswith(".model"):
        raise ConversionError(f"{path}: --tokenizer must be a folder of HF tokenizer files or a "
                              "sentencepiece .model file")
    from transformers import LlamaTokenizer

    LlamaTokenizer(vocab_file=path).save_pretrained(dst)


def convert(src: str, dst: str, tokenizer: str | None = None, dtype: str = "float32",
            max_shard_bytes: int = 5 * 10**9) -> str:
    """Write an HF Llama folder from an agpt-jax checkpoint (or a run's newest step)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConversionError(f"--dtype {dtype!r}: choose float32, bfloat16 or float16")
    directory = checkpoint.resolve_checkpoint_dir(src)
    config = checkpoint.model_config(directory)
    reader = checkpoint.PyTreeItemReader(os.path.join(directory, checkpoint.ITEM_PARAMS))
    for path, shape in megatron_layout.flax_shapes(config).items():
        if path not in reader.paths or reader.shape(path) != shape:
            raise checkpoint.CheckpointError(f"{reader.item_dir}: leaf {checkpoint.leaf_key(path)!r} missing or "
                                     f"not of shape {shape}")
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)

    def write(tmp: str) -> None:
        shards: list[list[str]] = []
        weight_map: dict[str, str] = {}
        current: dict[str, Any] = {}
        size = 0
        total = 0

        def flush() -> None:
            nonlocal current, size
            if current:
                name = f"model-{len(shards) + 1:05d}.safetensors"
                save_file(current, os.path.join(tmp, name), metadata={"format": "pt"})
                shards.append(list(current))
                for k in current:
                    weight_map[k] = name
                current, size = {}, 0

        for name, w in hf_tensors(reader, config):
            # Round to nearest even, as torch's .to(dtype) does.
            t = np.ascontiguousarray(np.asarray(w, np.float32).astype(np_dtype))
            nbytes = t.nbytes
            if current and size + nbytes > max_shard_bytes:
                flush()
            current[name] = t
            size += nbytes
            total += nbytes
        flush()
        n = len(shards)
        renamed = {}
        for i in range(n):  # HF's sharded naming: model-0000i-of-0000n.safetensors
            old = f"model-{i + 1:05d}.safetensors"
            new = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(tmp, old), os.path.join(tmp, new))
            renamed[old] = new
        if n > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total},
                           "weight_map": {k: renamed[v] for k, v in weight_map.items()}}, f,
                          indent=1)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(config, dtype), f, indent=1)
        if tokenizer:
            _copy_tokenizer(tokenizer, tmp)

    write_atomically(dst, write)
    return os.path.abspath(dst)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code: 0, 2 bad input, 1 a failed write."""
    fv = flags.FlagValues()
    flags.DEFINE_string("load", None, "agpt-jax checkpoint or run --save root", required=True,
                        flag_values=fv)
    flags.DEFINE_string("save", None, "HF model folder to create", required=True, flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "HF tokenizer folder or sentencepiece tokenizer.model "
                        "to include", flag_values=fv)
    flags.DEFINE_string("dtype", "float32", "float32 | bfloat16 | float16", flag_values=fv)
    flags.DEFINE_float("max-shard-gb", 5.0, "safetensors shard size", flag_values=fv)
    flags.DEFINE_bool("debug", False, "show tracebacks", flag_values=fv)
    args = cli.parse(fv, argv, __doc__)
    return run_cli(lambda: convert(args.load, args.save, args.tokenizer, args.dtype,
                                   int(args.max_shard_gb * 1e9)), args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
