"""agpt-jax Orbax checkpoint -> DeepSpeed universal checkpoint that Megatron-DeepSpeed loads.

    python -m converters.orbax_to_universal --load SRC --save DST

SRC is a converted checkpoint or a training run (newest finalized step, see
`agpt_jax.checkpoint.resolve_checkpoint_dir`). DST becomes a Megatron `--load` root:

    DST/latest_universal                                   "global_stepN_universal"
    DST/global_stepN_universal/mp_rank_00_model_states.pt  args (Namespace), iteration,
                                                           checkpoint_version, module, DeepSpeed
                                                           keys, universal_checkpoint_info
    DST/global_stepN_universal/zero/optimizer_state.pt     param_groups, ds_version, clip_grad, ...
    DST/global_stepN_universal/zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt   {'param', 'cat_dim',
                                                           ['param_n_sub_params'], ['vocab_tensor']}
    DST/global_stepN_universal/zero/<param>/step.pt        0-d float32 tensor

with the dict keys and flags ds_to_universal.py writes (spec §3.4-3.5, §7), so DeepSpeed's
`load_hp_checkpoint_state` reads it: vocabulary tensors keep only the original vocabulary rows
(DeepSpeed pads them back with zeros), dense_h_to_4h is marked `param_n_sub_params=2`, `cat_dim`
is 0.

What cannot be carried through JSON metadata is left out, and DeepSpeed/Megatron fall back as
follows: the DeepSpeed loss-scaler object (`_load_global_state` keeps its live scaler when the key
is absent) and Megatron's `rng_state` (load with `--finetune`, the CPT recipe, or `--no-load-rng`).
Megatron enums inside `args` (model_type) are dropped from the Namespace; `check_checkpoint_args`
does not read them. Every tensor file loads with `torch.load(weights_only=True)`, and so does
`zero/optimizer_state.pt` (DeepSpeed's own does not, because of the loss scaler). The files are
written without torch (`converters.pt_archive.save`), in torch.save's own format.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from absl import flags, logging

from agpt_jax import checkpoint, cli
from agpt_jax.model import GPTConfig
from converters import megatron_layout
from converters import pt_archive
from converters import universal
from converters import run_cli, write_atomically

# ds_version written when the source never came from DeepSpeed (the version of spec §7).
DEFAULT_DS_VERSION = "0.16.9"
CHECKPOINT_VERSION = 3.0

TensorSource = Callable[[megatron_layout.MegatronTensor, str], np.ndarray]


@dataclasses.dataclass
class UniversalContents:
    """Everything of a universal checkpoint except the tensors.

    Attributes:
        config: the model.
        scheme: parameter naming scheme.
        iteration: Megatron iteration (names the folder global_step{iteration}_universal).
        step: Adam step written to every step.pt.
        param_groups: optimizer param groups (lr, betas, eps, weight_decay, ...).
        args: Megatron args (JSON-safe values; foreign objects are dropped).
        checkpoint_version: Megatron's checkpoint_version.
        universal_info: universal_checkpoint_info.
        zero_optimizer_state: other keys of zero/optimizer_state.pt (ds_version, clip_grad, ...).
        model_states: other top-level keys of mp_rank_00_model_states.pt (DeepSpeed's).
    """

    config: GPTConfig
    scheme: megatron_layout.NameScheme
    iteration: int
    step: float
    param_groups: list[dict[str, Any]]
    args: dict[str, Any]
    checkpoint_version: Any = CHECKPOINT_VERSION
    universal_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    zero_optimizer_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    model_states: dict[str, Any] = dataclasses.field(default_factory=dict)


def _is_foreign(value: Any) -> bool:
    return isinstance(value, Mapping) and "pickled_class" in value


def _torch_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON param groups back to torch's form: betas is a tuple."""
    out = []
    for g in groups:
        g = {k: v for k, v in g.items() if not _is_foreign(v)}
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        out.append(g)
    return out


def default_universal_info(config: GPTConfig, scheme: megatron_layout.NameScheme) -> dict[str, Any]:
    """universal_checkpoint_info as Megatron-DeepSpeed's GPT model builds it (TP=1, spec §3.2)."""
    if scheme is megatron_layout.NameScheme.MODULE:
        vocab = ["language_model.embedding.word_embeddings.weight",
                 "language_model.output_layer.weight"]
        sub2 = [r"language_model.encoder.layers.\d+.mlp.dense_h_to_4h.weight"]
    else:
        vocab = [r"\d+.word_embeddings.weight", r"\d+.lm_head.weight"]
        sub2 = [r"\d+.mlp.dense_h_to_4h.weight"]
    return {"universal_checkpoint_version": 0.2, "original_vocab_size": config.vocab_size,
            "padded_vocab_size": config.padded_vocab_size,
            "vocabulary_parameter_patterns": vocab,
            "parameter_with_2_sub_params_cat_dim_0": sub2}


def _param_shapes(config: GPTConfig, tensors: list[megatron_layout.MegatronTensor]) -> list[Any]:
    """DeepSpeed's param_shapes: per param group, name -> torch.Size (Megatron's group order:
    weight-decayed 2-D weights first, then the 1-D norms, spec §2.4)."""
    decayed = collections.OrderedDict((t.name, pt_archive.TorchSize(t.shape)) for t in tensors
                                      if len(t.shape) == 2)
    plain = collections.OrderedDict((t.name, pt_archive.TorchSize(t.shape)) for t in tensors
                                    if len(t.shape) == 1)
    return [decayed, plain]


def _state_dict_for(t: megatron_layout.MegatronTensor, w: np.ndarray,
                    config: GPTConfig) -> dict[str, Any]:
    """One {fp32,exp_avg,exp_avg_sq}.pt dict with ds_to_universal's keys and flags."""
    if tuple(w.shape) != t.shape:
        raise ValueError(f"{t.name}: shape {w.shape}, expected {t.shape}")
    if t.is_vocab:
        w = w[: config.vocab_size]  # ds_to_universal keeps original_vocab_size rows (spec §3.4)
    out: dict[str, Any] = {"param": np.ascontiguousarray(w, np.float32), "cat_dim": 0}
    if t.n_sub_params == 2:
        out["param_n_sub_params"] = 2
    if t.is_vocab:
        out["vocab_tensor"] = True
    return out


def _module_tree(folder: str, tensors: list[megatron_layout.MegatronTensor],
                 config: GPTConfig) -> dict:
    """Megatron's nested `module` state dict (non-pipeline, spec §3.2), read back memory-mapped
    from the fp32.pt files just written, vocabulary tensors padded to V_pad with zero rows."""
    lm: dict[str, Any] = {"embedding": {"word_embeddings": {}}, "encoder": {},
                          "output_layer": {}}
    for t in tensors:
        p = _written_param(folder, t, config)
        if t.kind is megatron_layout.Kind.EMBEDDING:
            lm["embedding"]["word_embeddings"]["weight"] = p
        elif t.kind is megatron_layout.Kind.OUTPUT:
            lm["output_layer"]["weight"] = p
        else:
            lm["encoder"][t.name[len("language_model.encoder."):]] = p
    return {"language_model": lm}


def _write_pipeline_layers(folder: str, tensors: list[megatron_layout.MegatronTensor],
                           config: GPTConfig) -> None:
    """DeepSpeed PipelineModule's per-layer files `layer_{idx:02d}-model_00-model_states.pt`."""
    by_layer: dict[int, dict[str, Any]] = collections.defaultdict(collections.OrderedDict)
    for t in tensors:
        idx, local = t.name.split(".", 1)
        by_layer[int(idx)][local] = _written_param(folder, t, config)
    for idx, sd in by_layer.items():
        pt_archive.save(sd, os.path.join(folder, f"layer_{idx:02d}-model_00-model_states.pt"))


def _written_param(folder: str, t: megatron_layout.MegatronTensor, config: GPTConfig) -> np.ndarray:
    """A tensor's fp32.pt as just written (memory-mapped), vocabulary rows padded to V_pad."""
    p = pt_archive.load(os.path.join(folder, universal.ZERO, t.name, "fp32.pt"))["param"]
    if t.is_vocab:
        p = np.concatenate([p, np.zeros((config.padded_vocab_size - p.shape[0], p.shape[1]),
                                        p.dtype)])
    return p


def write_universal(root: str, contents: UniversalContents, source: TensorSource,
                    progress: bool = False) -> str:
    """Write a universal checkpoint under an existing `root` (Megatron's --load root).

    Args:
        root: folder that receives `latest_universal` and `global_stepN_universal/`.
        contents: scalars and metadata.
        source: `source(tensor, state)` -> the full Megatron tensor (vocab tensors with V_pad
            rows), float32, for state in fp32 / exp_avg / exp_avg_sq; called one at a time.
        progress: tqdm bar over tensors.

    Returns:
        The global_stepN_universal folder.
    """
    from tqdm import tqdm

    cfg = contents.config
    tag = f"global_step{contents.iteration}_universal"
    folder = os.path.join(root, tag)
    zero = os.path.join(folder, universal.ZERO)
    os.makedirs(zero)
    tensors = megatron_layout.megatron_tensors(cfg, contents.scheme)
    step = np.array(contents.step, np.float32)
    for t in tqdm(tensors, desc="orbax->universal", unit="tensor",
                  disable=None if progress else True):
        pdir = os.path.join(zero, t.name)
        os.makedirs(pdir)
        for state in universal.STATE_FILES:
            pt_archive.save(_state_dict_for(t, source(t, state), cfg),
                            os.path.join(pdir, f"{state}.pt"))
        pt_archive.save(step, os.path.join(pdir, "step.pt"))

    opt: dict[str, Any] = {k: v for k, v in contents.zero_optimizer_state.items()
                           if not _is_foreign(v)}
    opt.setdefault("ds_version", DEFAULT_DS_VERSION)  # DeepSpeed asserts it is present
    opt["param_groups"] = _torch_param_groups(contents.param_groups)
    pt_archive.save(opt, os.path.join(zero, universal.OPTIMIZER_STATE))

    args = argparse.Namespace(**{k: v for k, v in contents.args.items() if not _is_foreign(v)})
    info = dict(contents.universal_info) or default_universal_info(cfg, contents.scheme)
    states: dict[str, Any] = {}
    for key, value in contents.model_states.items():
        if not _is_foreign(value):
            states[key] = value
    states["param_shapes"] = _param_shapes(cfg, tensors)
    states.setdefault("ds_version", opt["ds_version"])
    for key, default in (("buffer_names", []), ("optimizer", None), ("frozen_param_shapes", None),
                         ("shared_params", {}), ("frozen_param_fragments", None),
                         ("skipped_steps", 0), ("global_steps", contents.iteration),
                         ("dp_world_size", 1), ("mp_world_size", 1)):
        states.setdefault(key, default)
    states.update({
        "args": args,
        "checkpoint_version": contents.checkpoint_version,
        "iteration": contents.iteration,
        "universal_checkpoint_info": info,
    })
    if contents.scheme is megatron_layout.NameScheme.MODULE:
        states["module"] = _module_tree(folder, tensors, cfg)
    else:
        states["module"] = None
        _write_pipeline_layers(folder, tensors, cfg)
    pt_archive.save(states, os.path.join(folder, universal.MODEL_STATES))
    with open(os.path.join(root, universal.LATEST_UNIVERSAL), "w") as f:
        f.write(tag)
    return folder


def run_args(run: Mapping[str, Any], config: GPTConfig, iteration: int) -> dict[str, Any]:
    """The Megatron-DeepSpeed args (names of megatron/arguments.py) of an agpt-jax run, from its
    `run_config` (agpt_jax.config.RunConfig.to_json), so the exported checkpoint carries the
    run's own training settings (spec §1.2-1.4)."""
    s, b, o = run["schedule"], run["batch"], run["optim"]
    return {
        "seq_length": b["seq_length"],
        "max_position_embeddings": 16 * b["seq_length"],  # helpers.sh passes 16*SEQ
        "tensor_model_parallel_size": config.tensor_parallel_for_padding,
        "pipeline_model_parallel_size": 1, "init_method_std": config.init_std,
        "bf16": config.compute_dtype == "bfloat16", "iteration": iteration,
        "train_iters": run["train_iters"], "global_batch_size": b["global_batch_size"],
        "micro_batch_size": b["micro_batch"], "lr": s["max_lr"], "min_lr": s["min_lr"],
        "lr_decay_style": s["style"], "lr_warmup_fraction": s["warmup_fraction"],
        "lr_decay_iters": s["decay_iters"], "seed": run["data"]["seed"],
        "adam_beta1": o["beta1"], "adam_beta2": o["beta2"], "adam_eps": o["eps"],
        "weight_decay": o["weight_decay"], "clip_grad": o["clip_grad"],
    }


def run_param_groups(run: Mapping[str, Any], lr: float,
                     source_groups: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """torch/DeepSpeed param groups of an agpt-jax run (Megatron's order: decayed, then not),
    at the LR of its last update; the source checkpoint's groups lend their other fields."""
    o = run["optim"]
    if source_groups and len(source_groups) == 2:
        groups = [dict(g) for g in source_groups]
    else:
        groups = [{"wd_mult": 1.0, "lr_mult": 1.0, "amsgrad": False, "params": []},
                  {"wd_mult": 0.0, "lr_mult": 1.0, "amsgrad": False, "params": []}]
    for g, decayed in zip(groups, (True, False)):
        g.update({"lr": float(lr), "betas": [o["beta1"], o["beta2"]], "eps": o["eps"],
                  "weight_decay": o["weight_decay"] if decayed else 0.0})
    return groups


def contents_from_metadata(meta: Mapping[str, Any], config: GPTConfig,
                           step: float) -> UniversalContents:
    """UniversalContents from agpt-jax metadata: what universal_to_orbax recorded of the source
    and, for a training run's step, the run's own settings (`run_config`, `last_lr`)."""
    scheme = megatron_layout.NameScheme(meta.get("name_scheme",
                                                 megatron_layout.NameScheme.MODULE.value))
    iteration = int(meta.get("iteration") or 0)
    run = meta.get("run_config")
    groups = meta.get("param_groups")
    # The source's args (a legacy run's full flag set) updated with this run's values.
    args = dict(meta.get("megatron_args") or {})
    if run:
        args.update(run_args(run, config, iteration))
        lr = meta.get("last_lr")
        if lr is None and groups:  # a step written before last_lr was recorded
            lr = groups[0].get("lr")
        groups = run_param_groups(run, float(lr or 0.0), groups)
    # Model-shape args always come from the model config, so a checkpoint whose metadata lacks
    # them (e.g. trained from scratch) still exports as one Megatron can load.
    args.update(megatron_layout.megatron_model_args(config))
    args.setdefault("max_position_embeddings", config.seq_length)
    args.setdefault("tensor_model_parallel_size", config.tensor_parallel_for_padding)
    if not groups:
        raise universal.UniversalCheckpointError(
            "checkpoint metadata has no 'param_groups'; DeepSpeed needs them in "
            "zero/optimizer_state.pt (the training driver must record its optimizer's groups)")
    return UniversalContents(
        config=config, scheme=scheme, iteration=iteration, step=step,
        param_groups=list(groups), args=args,
        checkpoint_version=meta.get("checkpoint_version", CHECKPOINT_VERSION),
        universal_info=dict(meta.get("universal_checkpoint_info") or {}),
        zero_optimizer_state=dict(meta.get("zero_optimizer_state") or {}),
        model_states=dict(meta.get("megatron_model_states") or {}))


def convert(src: str, dst: str, progress: bool = True) -> str:
    """Convert an agpt-jax checkpoint (or a run's newest step) to a universal --load root."""
    directory = checkpoint.resolve_checkpoint_dir(src)
    meta = checkpoint.read_metadata(directory)
    config = checkpoint.model_config(directory)
    params = checkpoint.PyTreeItemReader(os.path.join(directory, checkpoint.ITEM_PARAMS))
    adam = checkpoint.PyTreeItemReader(os.path.join(directory, checkpoint.ITEM_ADAM)) if checkpoint.has_adam(
        directory) else None
    shapes = megatron_layout.flax_shapes(config)
    for path, shape in shapes.items():
        if path not in params.paths:
            raise checkpoint.CheckpointError(f"{params.item_dir}: no leaf {checkpoint.leaf_key(path)!r}")
        if params.shape(path) != shape:
            raise checkpoint.CheckpointError(f"{params.item_dir}: leaf {checkpoint.leaf_key(path)!r} has shape "
                                     f"{params.shape(path)}, the metadata's model needs {shape}")
    if adam is None:
        # A fresh torch Adam: zero moments and step 0 give the same first update.
        logging.warning("%s has no optimizer state; writing zero moments and step 0", directory)
        step = 0.0
    else:
        count = adam.read(("count",))
        step = float(count)
    contents = contents_from_metadata(meta, config, step)

    def source(t: megatron_layout.MegatronTensor, state: str) -> np.ndarray:
        if state != "fp32" and adam is None:
            return np.zeros(t.shape, np.float32)
        reader, prefix = (params, ()) if state == "fp32" else (
            adam, ("mu",) if state == "exp_avg" else ("nu",))
        parts = {}
        for path in megatron_layout.flax_paths_of(t.kind):
            index = t.layer if megatron_layout.is_stacked(path) else None
            parts[path] = reader.read(prefix + path, index).astype(np.float32, copy=False)
        return megatron_layout.from_flax(t, parts, config)

    write_atomically(dst, lambda tmp: write_universal(tmp, contents, source, progress))
    return os.path.abspath(dst)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code: 0, 2 bad input, 1 a failed write."""
    fv = flags.FlagValues()
    flags.DEFINE_string("load", None, "agpt-jax checkpoint or run --save root", required=True,
                        flag_values=fv)
    flags.DEFINE_string("save", None, "universal --load root to create", required=True,
                        flag_values=fv)
    flags.DEFINE_bool("debug", False, "show tracebacks", flag_values=fv)
    args = cli.parse(fv, argv, __doc__)
    return run_cli(lambda: convert(args.load, args.save), args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
