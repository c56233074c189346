"""Make real DeepSpeed ZeRO-1 checkpoints of a tiny Megatron-DeepSpeed GPT (test fixtures).

Not run by CI: it needs DeepSpeed, which the project does not depend on. It trains a few AdamW
steps of a tiny Llama-style GPT whose parameters carry Megatron-DeepSpeed's names, under DeepSpeed
ZeRO stage 1 on CPU (gloo, one local process per data-parallel rank), saves with
`engine.save_checkpoint(save_dir, client_state=...)` and the client state Megatron-DeepSpeed passes
(megatron/checkpointing.py `save_checkpoint`; spec/zero-shards.md §2), then runs DeepSpeed's own
`python -m deepspeed.checkpoint.ds_to_universal` on each checkpoint and keeps its output where it
works. It rewrites tests/fixtures/zero_<case>/ and tests/fixtures/zero_README.md (or those of the
folder given as its one argument):

    pip install deepspeed==0.16.9          # in the Python 3.11 environment that has torch
    pip install --no-deps --target DS0163 deepspeed==0.16.3
    python scripts/make_zero_fixtures.py tests/fixtures --old-deepspeed DS0163
    python scripts/make_zero_fixtures.py tests/fixtures --case dp8_bf16

Without --old-deepspeed every case but dp8_fp32_ds0163 is made (and the README lists only those).
The committed fixtures were made with DeepSpeed 0.16.9 (0.16.3 for dp8_fp32_ds0163) and torch
2.13.0+cpu (CPU accelerator,
`DS_ACCELERATOR=cpu`, gloo); zero_README.md records the versions of the run that wrote them.

Cases (spec §3, §5, §10):
  dp3_fp32   DP=3 fp32, DeepSpeedZeroOptimizer, hidden 32 (both groups padded on the last rank)
  dp3_bf16   DP=3 bf16, grad_accum_dtype left bf16 -> DeepSpeedZeroOptimizer
  dp8_fp32   DP=8 fp32, DeepSpeedZeroOptimizer, hidden 8: the norm group (N=40, S=6, P-N=8 > S)
             has padding spanning the last two ranks
  dp8_bf16   the same model in bf16 with data_types.grad_accum_dtype fp32 -> BF16_Optimizer,
             whose group_paddings put all P-N on the last rank: ds_to_universal's 768-rank crash
  dp8_fp32_ds0163  dp8_fp32 trained with DeepSpeed 0.16.3 (AuroraGPT's writer, before PR #6974:
             group_paddings P-N on the last rank only, fp32 partitions cut by t[:S - padding]);
             made only with --old-deepspeed DIR, a `pip install --no-deps --target DIR
             deepspeed==0.16.3` folder put first on the workers' PYTHONPATH (ds_to_universal
             is still the main install's)

What is not DeepSpeed's output in a fixture folder: `latest_checkpointed_iteration.txt` (written
here as Megatron writes it after a save). DeepSpeed's copy of its `zero_to_fp32.py` that the engine
drops into the save folder is deleted (it is DeepSpeed's source, not checkpoint data). Megatron's
`args.model_type` is a `megatron.core.enums.ModelType`: the script puts a one-class stand-in
`megatron/core/enums.py` (the same enum as Megatron's) on PYTHONPATH for training and for
ds_to_universal, as a Megatron checkout would be; readers unpickle it as a foreign class.

The model follows Megatron-DeepSpeed's GPTModel (--no-pipeline-parallel, --swiglu,
--normalization rmsnorm, --untie-embeddings-and-output-weights, --disable-bias-linear, rotary,
GQA): its `named_parameters()` are Megatron's names in Megatron's order, the optimizer groups come
from a copy of Megatron's `get_param_groups` (weight-decay matrices, then no-wd norms), the LR comes
from a reduced copy of Megatron's OptimizerParamScheduler passed to `deepspeed.initialize` as
Megatron does, and the module state dict DeepSpeed saves is Megatron's nested
`state_dict_for_save_checkpoint` layout. One deliberate difference: the RMSNorm weights start at
1 + N(0, 0.1) instead of 1, so that the norms are told apart in tests even after bf16 rounding.

Over 400 lines on purpose: it is one tool run by hand, not by the package or CI; its pieces (the
Megatron-named model, the DeepSpeed training worker, the ds_to_universal run, the README table)
only make sense together, and splitting them would spread one fixture recipe over several files.
"""

from __future__ import annotations

import argparse  # the Namespace of Megatron's args in the checkpoints
import collections
import glob
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile

from absl import flags

from agpt_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two model shapes (spec/zero-shards.md §5: N = numel of a group, A = 2 D, P = ceil(N/A) A, S = P/D).
MODELS = {
    # hidden 32: matrix group N=30208, norm group N=160; at DP=3 both have P-N=2 on the last rank.
    "small": dict(L=2, H=32, NQ=4, NKV=2, F=88, V=100, VPAD=112, SEQ=16),
    # hidden 8: norm group N=(2L+1)H=40; at DP=8 A=16, P=48, S=6, real_r = 6,6,6,6,6,6,4,0 and
    # P-N=8 > S, the padding spans ranks 6 and 7 (the AuroraGPT 768-rank shape in small).
    "micro": dict(L=2, H=8, NQ=4, NKV=2, F=24, V=100, VPAD=112, SEQ=16),
}
CASES = {
    "dp3_fp32": dict(dp=3, dtype="fp32", grad_accum_fp32=False, model="small", seed=1),
    "dp3_bf16": dict(dp=3, dtype="bf16", grad_accum_fp32=False, model="small", seed=2),
    "dp8_fp32": dict(dp=8, dtype="fp32", grad_accum_fp32=False, model="micro", seed=3),
    "dp8_bf16": dict(dp=8, dtype="bf16", grad_accum_fp32=True, model="micro", seed=4),
    # The writer AuroraGPT used (DeepSpeed 0.16.3, before PR #6974): trained with that version
    # (--old-deepspeed), converted with the main one.
    "dp8_fp32_ds0163": dict(dp=8, dtype="fp32", grad_accum_fp32=False, model="micro", seed=5,
                            deepspeed="0.16.3"),
}
ITERATIONS = 5
MICRO_BATCH = 2
MAX_LR, MIN_LR, WEIGHT_DECAY = 1e-2, 1e-3, 0.1
BETAS, EPS, CLIP = (0.9, 0.95), 1e-8, 1.0
MAKE_VOCAB_DIVISIBLE_BY = 16
ROPE_THETA, NORM_EPS, INIT_STD = 500000.0, 1e-5, 0.02

_ENUMS_STANDIN = '''\
"""Stand-in for Megatron-DeepSpeed's megatron/core/enums.py (written by make_zero_fixtures.py)."""
import enum


class ModelType(enum.Enum):
    encoder_or_decoder = 1
    encoder_and_decoder = 2
    retro_encoder = 3
    retro_decoder = 4
'''


def write_megatron_standin(root: str) -> str:
    """A `megatron.core.enums` package under root (for pickling/unpickling args.model_type)."""
    for sub in ("megatron", os.path.join("megatron", "core")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        open(os.path.join(root, sub, "__init__.py"), "w").close()
    with open(os.path.join(root, "megatron", "core", "enums.py"), "w") as f:
        f.write(_ENUMS_STANDIN)
    return root


# ----------------------------------------------------------------------------------------------
# Worker side: one DP rank (run under torch.distributed.run).


def ds_config(case: dict) -> dict:
    """The DeepSpeed config ALCF's helpers.sh `generateDSconfig` writes, for ZeRO stage 1."""
    cfg = {
        "train_batch_size": MICRO_BATCH * case["dp"],
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_clipping": CLIP,
        "steps_per_print": 1,
        "gradient_accumulation_steps": 1,
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": 1},
    }
    if case["dtype"] == "bf16":
        cfg["fp16"] = {"enabled": False, "loss_scale": 0, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
        cfg["bfloat16"] = {"enabled": True}
        if case["grad_accum_fp32"]:
            # helpers.sh adds this when PP > 1; it makes the engine pick BF16_Optimizer.
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    else:
        cfg["communication_data_type"] = "fp32"
    return cfg


def build_model(torch, m: dict):
    """Megatron-DeepSpeed's GPTModel, reduced to the Llama configuration, on plain torch."""
    nn, F = torch.nn, torch.nn.functional
    L, H, NQ, NKV, FF, VPAD = m["L"], m["H"], m["NQ"], m["NKV"], m["F"], m["VPAD"]
    D, G = H // NQ, NQ // NKV

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(H))

        def forward(self, x):
            xf = x.float()
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + NORM_EPS)
            return y.type_as(x) * self.weight

    class RotaryEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer(
                "inv_freq", 1.0 / (ROPE_THETA ** (torch.arange(0, D, 2).float() / D)))

        def forward(self, s):
            freqs = torch.outer(torch.arange(s).float(), self.inv_freq.float())
            return torch.cat([freqs, freqs], -1)  # [s, D], halves (Megatron _rotate_half)

    def rope(t, emb):  # t [b, s, n, D]
        c, s_ = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
        t1, t2 = t.float().chunk(2, -1)
        return (t.float() * c + torch.cat([-t2, t1], -1) * s_).type_as(t)

    class ParallelAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.query_key_value = nn.Linear(H, (NQ + 2 * NKV) * D, bias=False)
            self.dense = nn.Linear(NQ * D, H, bias=False)

        def forward(self, x, emb):
            b, s, _ = x.shape
            # Rows grouped per kv head j: [q_{jG}, ..., q_{jG+G-1}, k_j, v_j] (spec §4.2).
            qkv = self.query_key_value(x).view(b, s, NKV, G + 2, D)
            q = qkv[:, :, :, :G].reshape(b, s, NQ, D)
            k, v = qkv[:, :, :, G], qkv[:, :, :, G + 1]
            q, k = rope(q, emb), rope(k, emb)
            k, v = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True)
            return self.dense(o.transpose(1, 2).reshape(b, s, NQ * D))

    class ParallelMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense_h_to_4h = nn.Linear(H, 2 * FF, bias=False)  # [gate; up]
            self.dense_4h_to_h = nn.Linear(FF, H, bias=False)

        def forward(self, x):
            gate, up = self.dense_h_to_4h(x).chunk(2, -1)
            return self.dense_4h_to_h(F.silu(gate) * up)

    class ParallelTransformerLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = RMSNorm()
            self.self_attention = ParallelAttention()
            self.post_attention_layernorm = RMSNorm()
            self.mlp = ParallelMLP()

        def forward(self, x, emb):
            x = x + self.self_attention(self.input_layernorm(x), emb)
            return x + self.mlp(self.post_attention_layernorm(x))

    class ParallelTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(ParallelTransformerLayer() for _ in range(L))
            self.final_layernorm = RMSNorm()

        def forward(self, x, emb):
            for layer in self.layers:
                x = layer(x, emb)
            return self.final_layernorm(x)

    class Embedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(VPAD, H)

        def forward(self, tokens):
            return self.word_embeddings(tokens)

    class TransformerLanguageModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = Embedding()
            self.rotary_pos_emb = RotaryEmbedding()
            self.encoder = ParallelTransformer()
            self.output_layer = nn.Linear(H, VPAD, bias=False)

        def forward(self, tokens):
            h = self.embedding(tokens)
            return self.output_layer(self.encoder(h, self.rotary_pos_emb(tokens.shape[1])))

        def state_dict_for_save_checkpoint(self, prefix="", keep_vars=False):
            # megatron/model/language_model.py: embedding -> {word_embeddings: {weight}},
            # encoder -> flat state dict, output_layer -> {weight}; rotary is not saved.
            return {
                "embedding": {"word_embeddings": self.embedding.word_embeddings.state_dict(
                    prefix=prefix, keep_vars=keep_vars)},
                "encoder": self.encoder.state_dict(prefix=prefix, keep_vars=keep_vars),
                "output_layer": self.output_layer.state_dict(prefix=prefix, keep_vars=keep_vars),
            }

    class GPTModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = TransformerLanguageModel()

        def forward(self, tokens, labels):
            logits = self.language_model(tokens)
            return F.cross_entropy(logits.float().reshape(-1, VPAD), labels.reshape(-1))

        def state_dict_for_save_checkpoint(self, prefix="", keep_vars=False):
            return {"language_model": self.language_model.state_dict_for_save_checkpoint(
                prefix=prefix, keep_vars=keep_vars)}

    model = GPTModel()
    # Megatron's init: normal(0, std); output projections normal(0, std / sqrt(2 L)).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # not Megatron's ones: see docstring
            elif name.endswith(("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")):
                p.normal_(0.0, INIT_STD / math.sqrt(2.0 * L))
            else:
                p.normal_(0.0, INIT_STD)
    return model


def get_param_groups(modules):
    """megatron/optimizer/__init__.py get_param_groups with its default conditions."""
    wd_no_scale_lr, no_wd_no_scale_lr = [], []
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            no_wd = name.endswith(".bias") or len(param.shape) == 1
            (no_wd_no_scale_lr if no_wd else wd_no_scale_lr).append(param)
    groups = []
    if wd_no_scale_lr:
        groups.append({"name": "wd_no_scale_lr", "params": wd_no_scale_lr,
                       "wd_mult": 1.0, "lr_mult": 1.0})
    if no_wd_no_scale_lr:
        groups.append({"name": "no_wd_no_scale_lr", "params": no_wd_no_scale_lr,
                       "wd_mult": 0.0, "lr_mult": 1.0})
    return groups


class OptimizerParamScheduler:
    """megatron/optimizer_param_scheduler.py, reduced to linear warmup + cosine decay in samples
    and a constant weight decay; `state_dict` has Megatron's keys."""

    def __init__(self, optimizer, max_lr, min_lr, lr_warmup_steps, lr_decay_steps, wd):
        self.optimizer = optimizer
        self.max_lr, self.min_lr = float(max_lr), min_lr
        self.lr_warmup_steps, self.lr_decay_steps = lr_warmup_steps, lr_decay_steps
        self.lr_warmup_tokens, self.lr_decay_tokens = None, None
        self.lr_decay_style = "cosine"
        self.start_wd = self.end_wd = wd
        self.wd_incr_steps, self.wd_incr_style = lr_decay_steps, "constant"
        self.num_steps, self.num_tokens = 0, 0
        self.step(0, 0)

    def get_lr(self):
        if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            return self.max_lr * float(self.num_steps) / float(self.lr_warmup_steps)
        if self.num_steps > self.lr_decay_steps:
            return self.min_lr
        ratio = (self.num_steps - self.lr_warmup_steps) / (self.lr_decay_steps -
                                                          self.lr_warmup_steps)
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment, token_num=None):
        if token_num is not None:
            self.num_tokens = token_num
        self.num_steps += increment
        lr, wd = self.get_lr(), self.end_wd
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    def state_dict(self):
        return {k: getattr(self, k) for k in (
            "max_lr", "lr_warmup_steps", "lr_warmup_tokens", "num_steps", "num_tokens",
            "lr_decay_style", "lr_decay_steps", "lr_decay_tokens", "min_lr", "start_wd", "end_wd",
            "wd_incr_style", "wd_incr_steps")}

    def load_state_dict(self, sd):
        for k, v in sd.items():
            setattr(self, k, v)


def megatron_args(torch, case: dict, m: dict, dp: int, config: dict):
    """The argparse Namespace Megatron-DeepSpeed saves as `args` (the model args the universal
    fixture uses, plus the run fields a real run has)."""
    from megatron.core.enums import ModelType  # the stand-in on PYTHONPATH

    bf16 = case["dtype"] == "bf16"
    gbs = MICRO_BATCH * dp
    return argparse.Namespace(
        num_layers=m["L"], hidden_size=m["H"], num_attention_heads=m["NQ"],
        num_key_value_heads=m["NKV"], kv_channels=m["H"] // m["NQ"], ffn_hidden_size=m["F"],
        seq_length=m["SEQ"], max_position_embeddings=m["SEQ"], rope_theta=ROPE_THETA,
        layernorm_epsilon=NORM_EPS, make_vocab_size_divisible_by=MAKE_VOCAB_DIVISIBLE_BY,
        padded_vocab_size=m["VPAD"], tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, sequence_parallel_size=1, swiglu=True,
        normalization="rmsnorm", untie_embeddings_and_output_weights=True, add_bias_linear=False,
        use_rotary_position_embeddings=True, add_position_embedding=False,
        position_embedding_type="rotary", hidden_dropout=0.0, attention_dropout=0.0,
        model_type=ModelType.encoder_or_decoder,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16, fp16=False,
        optimizer="adamw", lr=MAX_LR, min_lr=MIN_LR, lr_decay_style="cosine",
        lr_warmup_iters=1, lr_decay_iters=2 * ITERATIONS, weight_decay=WEIGHT_DECAY,
        start_weight_decay=WEIGHT_DECAY, end_weight_decay=WEIGHT_DECAY,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=EPS, clip_grad=CLIP,
        micro_batch_size=MICRO_BATCH, global_batch_size=gbs, data_parallel_size=dp,
        world_size=dp, rank=0, train_iters=ITERATIONS, iteration=ITERATIONS,
        consumed_train_samples=ITERATIONS * gbs,
        consumed_train_tokens=ITERATIONS * gbs * m["SEQ"], init_method_std=INIT_STD,
        seed=case["seed"], tokenizer_type="Llama2Tokenizer", deepspeed=True, zero_stage=1,
        no_pipeline_parallel=True, ds_pipeline_enabled=False, deepspeed_config_dict=config,
        universal_checkpoint=False, use_distributed_optimizer=False,
        save="checkpoints", data_parallel_random_init=False)


def worker(case_name: str, save_dir: str) -> None:
    """One DP rank: train ITERATIONS steps and save (env from torch.distributed.run)."""
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    case, m = CASES[case_name], MODELS[CASES[case_name]["model"]]
    assert get_accelerator().device_name() == "cpu", get_accelerator().device_name()
    want = case.get("deepspeed")
    assert want is None or deepspeed.__version__ == want, (deepspeed.__version__, want)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, dp = torch.distributed.get_rank(), torch.distributed.get_world_size()
    assert dp == case["dp"], (dp, case)

    torch.manual_seed(case["seed"])  # the same initial model on every rank
    random.seed(case["seed"])
    np.random.seed(case["seed"])
    model = build_model(torch, m)
    config = ds_config(case)
    args = megatron_args(torch, case, m, dp, config)
    optimizer = torch.optim.AdamW(get_param_groups([model]), lr=MAX_LR,
                                  weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS)
    gbs = MICRO_BATCH * dp
    scheduler = OptimizerParamScheduler(optimizer, MAX_LR, MIN_LR, lr_warmup_steps=gbs,
                                        lr_decay_steps=2 * ITERATIONS * gbs, wd=WEIGHT_DECAY)
    engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                lr_scheduler=scheduler, config=config)
    if rank == 0:
        print(f"[{case_name}] optimizer class {type(ds_opt).__name__}", flush=True)

    data = torch.Generator().manual_seed(1000 * case["seed"] + rank)
    tokens_seen = 0
    for it in range(1, ITERATIONS + 1):
        batch = torch.randint(0, m["V"], (MICRO_BATCH, m["SEQ"] + 1), generator=data)
        loss = engine(batch[:, :-1], batch[:, 1:])
        engine.backward(loss)
        tokens_seen += gbs * m["SEQ"]
        engine.step(lr_kwargs={"increment": gbs, "token_num": tokens_seen})
        if rank == 0:
            print(f"[{case_name}] iteration {it} loss {loss.item():.4f}", flush=True)
    assert engine.global_steps == ITERATIONS

    # megatron/checkpointing.py save_checkpoint with --deepspeed --no-pipeline-parallel.
    rng_state = [{
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": get_accelerator().get_rng_state(),
        "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
    }]
    state_dict = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": ITERATIONS,
        "tokens": args.consumed_train_tokens,
        "universal_checkpoint_info": {
            "universal_checkpoint_version": 0.2,
            "original_vocab_size": m["V"],
            "padded_vocab_size": m["VPAD"],
            "vocabulary_parameter_patterns": ["language_model.embedding.word_embeddings.weight",
                                              "language_model.output_layer.weight"],
            "parameter_with_2_sub_params_cat_dim_0": [
                r"language_model.encoder.layers.\d+.mlp.dense_h_to_4h.weight"],
        },
        "rng_state": rng_state,
    }
    module = engine.module
    original_state_dict = module.state_dict

    def state_dict_for_save_checkpoint_deepspeed(destination=None, prefix="", keep_vars=False):
        return module.state_dict_for_save_checkpoint(prefix=prefix, keep_vars=keep_vars)

    module.state_dict = state_dict_for_save_checkpoint_deepspeed
    engine.save_checkpoint(save_dir, client_state=state_dict)
    module.state_dict = original_state_dict
    torch.distributed.barrier()
    if rank == 0:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(ITERATIONS))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Driver side.


def _env(standin: str, deepspeed_path: str | None = None) -> dict:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"
    first = [deepspeed_path] if deepspeed_path else []
    env["PYTHONPATH"] = os.pathsep.join(first + [standin] +
                                        [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run_case(name: str, out_root: str, standin: str, logs: str,
             old_deepspeed: str | None = None) -> dict:
    case = CASES[name]
    train_ds = old_deepspeed if case.get("deepspeed") else None
    folder = os.path.join(out_root, f"zero_{name}")
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={case['dp']}", os.path.abspath(__file__), "--worker", name,
           "--save", folder]
    log = os.path.join(logs, f"{name}.train.log")
    print("$ DS_ACCELERATOR=cpu", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, env=_env(standin, train_ds), stdout=f,
                             stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"training {name} failed (rc {rc}); see {log}:\n" + _tail(log, 40))
    optimizer_class = next((line.split("optimizer class ")[1].strip() for line in open(log)
                            if "optimizer class " in line), "?")
    losses = [line.split(" loss ")[1].strip() for line in open(log)
              if f"[{name}] iteration " in line]
    recovery = os.path.join(folder, "zero_to_fp32.py")
    if os.path.exists(recovery):
        os.remove(recovery)
    with open(os.path.join(folder, "latest")) as f:
        tag = f.read().strip()
    universal = os.path.join(folder, f"{tag}_universal")
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           os.path.join(folder, tag), "--output_folder", universal]
    log = os.path.join(logs, f"{name}.ds_to_universal.log")
    print("$ DS_ACCELERATOR=cpu", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, env=_env(standin), stdout=f, stderr=subprocess.STDOUT)
    result = {"case": name, "folder": folder, "tag": tag, "optimizer_class": optimizer_class,
              "losses": losses, "ds_to_universal_rc": rc}
    if rc != 0:
        result["ds_to_universal_error"] = _last_error(log)
        result["ds_to_universal_tail"] = _tail(log, 25)
        shutil.rmtree(universal, ignore_errors=True)
        latest_universal = os.path.join(folder, "latest_universal")
        if os.path.exists(latest_universal):
            os.remove(latest_universal)
        print(f"  ds_to_universal failed: {result['ds_to_universal_error']}", flush=True)
    return result


def _tail(path: str, n: int) -> str:
    """The last n lines of a log, with the install prefixes of this machine's Python replaced by
    <site-packages>/ and <python>/ so the committed README names no local paths."""
    import site
    import sysconfig

    with open(path, errors="replace") as f:
        text = "".join(f.readlines()[-n:])
    prefixes = [(p, "<site-packages>") for p in site.getsitepackages()]
    prefixes.append((sysconfig.get_paths()["stdlib"], "<python>"))
    for prefix, name in sorted(prefixes, key=lambda x: -len(x[0])):
        text = text.replace(prefix.rstrip("/") + "/", name + "/")
    return text


def _last_error(path: str) -> str:
    lines = [line.rstrip() for line in open(path, errors="replace")]
    errors = [line for line in lines if "Error" in line and not line.startswith(" ")]
    return errors[-1] if errors else (lines[-1] if lines else "")


def _files_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def inspect_case(result: dict) -> dict:
    """Load every file of a case (torch.load, weights_only=False), lay the groups out by the
    spec §5 rule and check it against the files (and the universal copy where there is one)."""
    import torch

    folder, tag = result["folder"], result["tag"]
    tag_dir = os.path.join(folder, tag)
    mp = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), weights_only=False)
    files = glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    rank_of = lambda p: int(os.path.basename(p).split("zero_pp_rank_")[1].split("_")[0])
    files = sorted(files, key=rank_of)
    D = len(files)
    shards = [torch.load(p, weights_only=False)["optimizer_state_dict"] for p in files]
    keys = sorted(shards[0])
    groups = []
    full = collections.defaultdict(dict)
    for g, shapes in enumerate(mp["param_shapes"]):
        N = sum(math.prod(s) for s in shapes.values())
        A = 2 * D
        P = -(-N // A) * A
        S = P // D
        real = [max(0, min(S, N - r * S)) for r in range(D)]
        info = {"group": g, "name": shards[0]["base_optimizer_state"]["param_groups"][g]["name"],
                "params": len(shapes), "N": N, "P": P, "S": S, "P-N": P - N, "real_r": real,
                "len_exp_avg": [], "len_exp_avg_sq": [], "len_fp32": [], "group_paddings": []}
        flats = collections.defaultdict(list)
        for r, sd in enumerate(shards):
            st = sd["base_optimizer_state"]["state"][g]
            fp32 = sd["single_partition_of_fp32_groups"][g]
            info["len_exp_avg"].append(st["exp_avg"].numel())
            info["len_exp_avg_sq"].append(st["exp_avg_sq"].numel())
            info["len_fp32"].append(fp32.numel())
            info["group_paddings"].append(int(sd["group_paddings"][g]))
            assert sd["partition_count"][g] == D
            assert st["exp_avg"].numel() == S and fp32.numel() >= real[r]
            for k, t in (("fp32", fp32), ("exp_avg", st["exp_avg"]),
                         ("exp_avg_sq", st["exp_avg_sq"])):
                flats[k].append(t[:real[r]])
        info["step"] = sorted({float(sd["base_optimizer_state"]["state"][g]["step"])
                               for sd in shards})
        for k, parts in flats.items():
            flat = torch.cat(parts)
            assert flat.numel() == N
            off = 0
            for pname, shape in shapes.items():
                n = math.prod(shape)
                full[pname][k] = flat[off:off + n].view(shape)
                off += n
        groups.append(info)
    # The module weights are the fp32 master cast to the training dtype (spec §6).
    module = mp["module"]["language_model"]
    weights = {"language_model.embedding.word_embeddings.weight":
               module["embedding"]["word_embeddings"]["weight"],
               "language_model.output_layer.weight": module["output_layer"]["weight"]}
    weights.update({"language_model.encoder." + k: v for k, v in module["encoder"].items()})
    assert set(weights) == set(full), sorted(set(weights) ^ set(full))
    for pname, w in weights.items():
        assert torch.equal(full[pname]["fp32"].to(w.dtype), w), pname
    universal_checked = None
    udir = os.path.join(folder, f"{tag}_universal", "zero")
    if os.path.isdir(udir):
        V = mp["universal_checkpoint_info"]["original_vocab_size"]
        vocab = set(mp["universal_checkpoint_info"]["vocabulary_parameter_patterns"])
        for pname, states in full.items():
            for k, t in states.items():
                u = torch.load(os.path.join(udir, pname, f"{k}.pt"), weights_only=False)["param"]
                want = t[:V] if pname in vocab else t
                assert torch.equal(u, want), (pname, k)
        universal_checked = len(full)
    return {"keys": keys, "ranks": D, "files": [os.path.basename(p) for p in files],
            "module_dtype": str(next(iter(weights.values())).dtype),
            "param_shapes": [{k: list(v) for k, v in s.items()} for s in mp["param_shapes"]],
            "groups": groups, "universal_params_checked": universal_checked,
            "global_steps": mp["global_steps"], "ds_version": mp["ds_version"],
            "mp_keys": sorted(mp)}


def write_readme(out_root: str, results: list[dict], versions: dict) -> str:
    lines = [
        "# ZeRO stage-1 fixtures (real DeepSpeed checkpoints)", "",
        "Made by `scripts/make_zero_fixtures.py` (see its docstring; not run by CI) with "
        f"DeepSpeed {versions['deepspeed']} (the writer of each case is in the table; "
        f"ds_to_universal is always {versions['deepspeed']}), torch {versions['torch']}, Python "
        f"{versions['python']}, CPU accelerator (`DS_ACCELERATOR=cpu`), gloo, one local process "
        "per DP rank. Each folder is a Megatron-DeepSpeed save root: `latest`, "
        f"`latest_checkpointed_iteration.txt` (written by the script as Megatron does), "
        f"`global_step{ITERATIONS}/` (`mp_rank_00_model_states.pt` + one "
        "`[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt` per rank), and, where "
        "`python -m deepspeed.checkpoint.ds_to_universal` worked, its output "
        f"`global_step{ITERATIONS}_universal/` and `latest_universal`. DeepSpeed's copy of "
        "`zero_to_fp32.py` was deleted. Unpickling needs `weights_only=False` and stand-ins for "
        "DeepSpeed classes and `megatron.core.enums.ModelType` (args.model_type).", "",
        "Model (spec/zero-shards.md): Megatron-DeepSpeed GPT names (--no-pipeline-parallel), "
        "SwiGLU, RMSNorm, rotary, GQA, untied, no biases, vocab 100 padded to 112 "
        f"(make_vocab_size_divisible_by {MAKE_VOCAB_DIVISIBLE_BY}); {ITERATIONS} AdamW steps "
        f"(lr {MAX_LR} warmup 1 iteration, cosine, wd {WEIGHT_DECAY} on matrices only, clip "
        f"{CLIP}), micro batch {MICRO_BATCH}, GAS 1. Group 0 = wd_no_scale_lr (matrices), "
        "group 1 = no_wd_no_scale_lr (norm weights). RMSNorm weights start at 1 + N(0, 0.1).", "",
        "| case | DP | dtype | model (L, H, heads/kv, F) | writer DeepSpeed | optimizer class | "
        "file prefix | ds_to_universal | size |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c, m = CASES[r["case"]], MODELS[CASES[r["case"]]["model"]]
        dtype = c["dtype"] + (" + grad_accum_dtype fp32" if c["grad_accum_fp32"] else "")
        ok = "worked" if r["ds_to_universal_rc"] == 0 else "crashed"
        prefix = "bf16_" if c["dtype"] == "bf16" else "(none)"
        lines.append(
            f"| zero_{r['case']} | {c['dp']} | {dtype} | {m['L']}, {m['H']}, {m['NQ']}/{m['NKV']},"
            f" {m['F']} | {r['summary']['ds_version']} | {r['optimizer_class']} | {prefix} | {ok} |"
            f" {r['size_kib']} KiB |")
    lines.append("")
    for r in results:
        s = r["summary"]
        lines += [f"## zero_{r['case']}", "",
                  f"- optimizer_state_dict keys: {', '.join(s['keys'])}",
                  f"- module dtype {s['module_dtype']}, global_steps {s['global_steps']}, "
                  f"losses {', '.join(r['losses'])}",
                  f"- ds_to_universal: " + (
                      f"worked; all {s['universal_params_checked']} parameters' fp32/exp_avg/"
                      "exp_avg_sq equal the spec §5 reassembly of the shards (vocab rows cut to 100)"
                      if r["ds_to_universal_rc"] == 0 else
                      f"crashed (rc {r['ds_to_universal_rc']}): `{r['ds_to_universal_error']}`; "
                      "its partial output was removed"), ""]
        lines += ["| group | params | N | P | S | P-N | real_r per rank | len(exp_avg) | "
                  "len(fp32 partition) | group_paddings | step |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for g in s["groups"]:
            j = lambda xs: ",".join(str(x) for x in xs)
            lines.append(
                f"| {g['group']} {g['name']} | {g['params']} | {g['N']} | {g['P']} | {g['S']} | "
                f"{g['P-N']} | {j(g['real_r'])} | {j(g['len_exp_avg'])} | {j(g['len_fp32'])} | "
                f"{j(g['group_paddings'])} | {j(g['step'])} |")
        if r["ds_to_universal_rc"] != 0:
            lines += ["", "ds_to_universal's last lines:", "", "```",
                      r["ds_to_universal_tail"].rstrip(), "```"]
        lines.append("")
    path = os.path.join(out_root, "zero_README.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    fv = flags.FlagValues()
    flags.DEFINE_multi_enum("case", None, sorted(CASES), "only these cases (repeatable; default: "
                            "all)", flag_values=fv)
    flags.DEFINE_string("old-deepspeed", None, "DIR: a --target install of deepspeed==0.16.3 (for "
                        "dp8_fp32_ds0163)", flag_values=fv)
    flags.DEFINE_string("worker", None, "internal: the case a training process runs",
                        flag_values=fv)
    flags.DEFINE_string("save", None, "internal: that process's save folder", flag_values=fv)
    a, rest = cli.parse_args(fv, argv, __doc__)
    if len(rest) > 1:
        print(f"error: one folder to write into, got {rest}", file=sys.stderr)
        sys.exit(cli.EXIT_USAGE)
    a.out = rest[0] if rest else os.path.join(REPO, "tests", "fixtures")
    if a.worker:
        worker(a.worker, a.save)
        return
    import torch
    import deepspeed

    versions = {"deepspeed": deepspeed.__version__, "torch": torch.__version__,
                "python": sys.version.split()[0]}
    print(versions, flush=True)
    os.environ["DS_ACCELERATOR"] = "cpu"
    work = tempfile.mkdtemp(prefix="zero_fixtures_")
    standin = write_megatron_standin(os.path.join(work, "standin"))
    sys.path.insert(0, standin)  # inspect_case's torch.load unpickles args.model_type, its enum
    results = []
    names = a.case or [n for n in CASES if a.old_deepspeed or not CASES[n].get("deepspeed")]
    for name in names:
        if CASES[name].get("deepspeed") and not a.old_deepspeed:
            raise SystemExit(f"{name} needs --old-deepspeed (DeepSpeed {CASES[name]['deepspeed']})")
        r = run_case(name, a.out, standin, work, a.old_deepspeed)
        r["size_kib"] = round(_files_size(r["folder"]) / 1024)
        r["summary"] = inspect_case(r)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "ds_to_universal_tail"},
                         indent=1, default=str), flush=True)
    if not a.case:
        print("wrote", write_readme(a.out, results, versions))
    print("logs in", work)


if __name__ == "__main__":
    main()
