"""Whole agpt_jax.train steps against a torch reference of Megatron-DeepSpeed's iteration.

The reference is written here in torch (fp32, CPU) from spec/megatron-deepspeed.md §2.1-2.4: HF
transformers' LlamaForCausalLM over the padded vocabulary (the padded rows take part in the
softmax), per micro-batch loss ``sum(CE) / num_tokens`` on fp32 logits, DeepSpeed's backward of
``loss / grad_acc_steps`` accumulated over the micro-batches, DeepSpeed's global-norm clipping,
``torch.optim.AdamW`` with Megatron's parameter groups (weight decay on the 2-D weights only), and
Megatron's warmup + cosine LR computed from its formula for each iteration. Only the initial weight
copy agpt-jax -> HF uses agpt-jax code (``converters.orbax_to_hf.hf_tensors``, checked against HF
logits in the converter tests); the same mapping lays agpt-jax's params and Adam moments out by HF
name for the comparison.

After each of three steps, the loss, the pre-clip gradient norm, the LR, every parameter and both
Adam moments of ``train.build_trainer``'s compiled step must equal the reference's to fp32
rounding, with and without gradient accumulation and with clipping active and inactive.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import numpy as np
import pytest

from agpt_jax import model as model_lib
from agpt_jax import optim
from agpt_jax import runtime
from agpt_jax import schedules
from agpt_jax import train
from converters.orbax_to_hf import hf_tensors
from torch_reference import llama_config, torch, transformers

pytestmark = pytest.mark.torch

# GQA (4 query heads over 2 kv heads) and a vocabulary of 300 padded to 384 (Megatron's 128 x TP=1).
CFG = model_lib.get_preset("tiny").replace(
    vocab_size=300, make_vocab_size_divisible_by=128, seq_length=16, compute_dtype="float32",
    param_dtype="float32", remat="none")
GBS = 6
STEPS = 3
BETA1, BETA2, EPS, WEIGHT_DECAY = 0.9, 0.95, 1e-5, 0.1
MAX_LR, MIN_LR, WARMUP_ITERS, TRAIN_ITERS = 3e-3, 3e-4, 1, 10
# The global gradient norm of these batches is ~1.5 (checked below): 0.05 always clips, 1e9 never.
CLIP_ACTIVE, CLIP_INACTIVE = 0.05, 1e9
DEEPSPEED_CLIP_EPS = 1e-6
# How far apart, in units of the LR, fp32 rounding may move one weight per update (see the test).
ADAM_NOISE = 3e-4


def _megatron_lr(num_steps: int) -> float:
    """Megatron's get_lr() (spec §2.2, warmup then cosine) at num_steps samples."""
    warmup, decay = WARMUP_ITERS * GBS, TRAIN_ITERS * GBS
    if warmup > 0 and num_steps <= warmup:
        return MAX_LR * num_steps / warmup
    if num_steps > decay:
        return MIN_LR
    ratio = (num_steps - warmup) / (decay - warmup)
    return MIN_LR + (MAX_LR - MIN_LR) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


def _batches() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1234)
    out = []
    for _ in range(STEPS):
        t = rng.integers(0, CFG.vocab_size, size=(GBS, CFG.seq_length + 1)).astype(np.int32)
        out.append({"tokens": t[:, :-1], "labels": t[:, 1:]})
    return out


class _TreeReader:
    """The read(path, layer) interface hf_tensors expects, over an in-memory agpt-jax tree."""

    def __init__(self, tree):
        self._tree = tree

    def read(self, path, index=None):
        leaf = np.asarray(functools.reduce(operator.getitem, path, self._tree), np.float32)
        return leaf if index is None else leaf[index]


def _by_hf_name(tree) -> dict[str, np.ndarray]:
    """An agpt-jax params-shaped tree (params, mu or nu) laid out as HF Llama tensors."""
    return {name: np.array(w, np.float32) for name, w in hf_tensors(_TreeReader(tree), CFG)}


# ------------------------------------------------------------------------------- the reference


def _torch_model(hf_weights: dict[str, np.ndarray]):
    hf_cfg = llama_config(CFG)
    model = transformers.LlamaForCausalLM(hf_cfg).float()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in hf_weights.items()},
                          strict=True)
    return model.train()


def _torch_run(hf_weights: dict[str, np.ndarray], batches, grad_acc_steps: int, clip_grad: float):
    """Megatron-DeepSpeed iterations in torch; per step: loss, grad norm, lr, params, moments."""
    torch.manual_seed(0)
    model = _torch_model(hf_weights)
    named = dict(model.named_parameters())
    # Megatron's get_param_groups: *.bias or 1-D -> no weight decay; everything else decays.
    decay = [p for n, p in named.items() if not (n.endswith(".bias") or p.ndim == 1)]
    no_decay = [p for n, p in named.items() if n.endswith(".bias") or p.ndim == 1]
    assert len(no_decay) == 2 * CFG.num_layers + 1  # the RMSNorm weights
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=0.0, betas=(BETA1, BETA2), eps=EPS, foreach=False, fused=False)
    rows = GBS // grad_acc_steps
    history = []
    for k, batch in enumerate(batches, start=1):
        lr = _megatron_lr((k - 1) * GBS)  # iteration k runs at num_steps = (k - 1) * GBS
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        losses = []
        for m in range(grad_acc_steps):  # Megatron's micro-batches: consecutive rows of the batch
            tokens = torch.from_numpy(batch["tokens"][m * rows:(m + 1) * rows].astype(np.int64))
            labels = torch.from_numpy(batch["labels"][m * rows:(m + 1) * rows].astype(np.int64))
            logits = model(input_ids=tokens).logits.float()
            assert logits.shape[-1] == CFG.padded_vocab_size  # padded rows are in the softmax
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
            loss = ce.sum() / labels.numel()  # loss mask all ones
            (loss / grad_acc_steps).backward()  # DeepSpeed scales by 1/gradient_accumulation_steps
            losses.append(loss.item())
        grads = [p.grad for p in named.values()]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        clip = (norm.item() + DEEPSPEED_CLIP_EPS) / clip_grad
        if clip > 1.0:
            for g in grads:
                g.div_(clip)
        opt.step()
        history.append({
            "loss": float(np.mean(losses)),
            "grad_norm": norm.item(),
            "clipped": clip > 1.0,
            "lr": lr,
            "params": {n: p.detach().numpy().copy() for n, p in named.items()},
            "mu": {n: opt.state[p]["exp_avg"].numpy().copy() for n, p in named.items()},
            "nu": {n: opt.state[p]["exp_avg_sq"].numpy().copy() for n, p in named.items()},
            "count": int(opt.state[named["lm_head.weight"]]["step"].item()),
        })
    return history


# ------------------------------------------------------------------------------- agpt-jax


def _trainer(grad_acc_steps: int, clip_grad: float) -> train.CompiledTrainer:
    schedule = schedules.make_schedule(schedules.ScheduleConfig(
        style="cosine", max_lr=MAX_LR, min_lr=MIN_LR, train_iters=TRAIN_ITERS,
        warmup_iters=WARMUP_ITERS, global_batch_size=GBS))
    optim_cfg = optim.OptimConfig(beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=WEIGHT_DECAY,
                                  clip_grad=clip_grad)
    mesh = runtime.make_mesh(runtime.MeshConfig(data=1, fsdp=1, tensor=1),
                             devices=jax.devices()[:1])
    return train.build_trainer(CFG, optim_cfg, schedule, train.StepConfig(GBS, grad_acc_steps), mesh)


@pytest.fixture(scope="module")
def initial_state() -> train.TrainState:
    """trainer.init's state on the host; the same for every case (compiled once, ~3 s)."""
    state = _trainer(1, CLIP_INACTIVE).init(jax.random.PRNGKey(7))

    def host(x):
        a = np.array(x)
        a.flags.writeable = False  # shared by every case: nothing may change it
        return a

    return jax.tree.map(host, state)


def _jax_run(grad_acc_steps: int, clip_grad: float, host_state: train.TrainState, batches):
    """build_trainer's compiled steps on one device from host_state; results after each step."""
    trainer = _trainer(grad_acc_steps, clip_grad)
    state = jax.device_put(host_state, trainer.state_shardings)  # the steps donate this copy
    history = []
    for batch in batches:
        state, metrics = trainer.step(
            state, {k: jax.device_put(v, trainer.batch_sharding) for k, v in batch.items()})
        count, mu, nu = optim.adam_state(state.opt_state)
        history.append({
            "loss": float(metrics["loss"]),
            "grad_norm": float(metrics["grad_norm"]),
            "lr": float(metrics["lr"]),
            "skipped": int(metrics["skipped"]),
            "params": _by_hf_name(state.params),
            "mu": _by_hf_name(mu),
            "nu": _by_hf_name(nu),
            "count": int(count),
        })
    return history


def _assert_close(name: str, actual: np.ndarray, expected: np.ndarray, rtol: float,
                  atol_scale: float) -> None:
    """|a - e| <= rtol |e| + atol_scale * max|e|: relative, with a floor scaled to the tensor."""
    atol = atol_scale * float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("clip_grad", [CLIP_INACTIVE, CLIP_ACTIVE], ids=["no_clip", "clip"])
@pytest.mark.parametrize("grad_acc_steps", [1, 3])
def test_train_steps_match_torch_megatron_reference(initial_state, grad_acc_steps: int,
                                                    clip_grad: float):
    """Loss, grad norm, LR, params and Adam moments after each step equal the torch reference."""
    batches = _batches()
    want = _torch_run(_by_hf_name(initial_state.params), batches, grad_acc_steps, clip_grad)
    got = _jax_run(grad_acc_steps, clip_grad, initial_state, batches)

    lrs = [_megatron_lr(k * GBS) for k in range(STEPS)]
    assert lrs[0] == 0.0 and len(set(lrs)) == STEPS  # warmup from 0, a different LR every step
    lr_sum = 0.0
    for step, (g, w) in enumerate(zip(got, want), start=1):
        lr_sum += w["lr"]
        where = f"step {step}"
        assert g["skipped"] == 0, where
        assert w["clipped"] == (clip_grad == CLIP_ACTIVE), (where, w["grad_norm"])
        assert g["count"] == w["count"] == step, where
        np.testing.assert_allclose(g["lr"], w["lr"], rtol=1e-6, err_msg=where)
        np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-6, err_msg=where)
        np.testing.assert_allclose(g["grad_norm"], w["grad_norm"], rtol=1e-5, err_msg=where)
        assert set(g["params"]) == set(w["params"])
        for name in w["params"]:
            p_want = w["params"][name]
            # fp32 rounding of the weights (1e-6 of the tensor), plus Adam's amplification of the
            # gradients' rounding delta_g: the direction m / (sqrt(v) + eps) moves by about
            # delta_g * eps / (|g| + eps)^2, up to delta_g / eps = 1e5 delta_g where g is near 0.
            # The gradients agree to 4e-8 (5e-7 of the largest; the moments check it), so a
            # weight may drift ~1e-4 x lr per update (worst seen in the four cases: 8.9e-5 x the
            # summed LR). 3e-4 x the summed LR covers that and stays 300x below a 0.1 x lr
            # weight decay applied where none belongs.
            np.testing.assert_allclose(
                g["params"][name], p_want, rtol=1e-6,
                atol=1e-6 * float(np.max(np.abs(p_want))) + ADAM_NOISE * lr_sum,
                err_msg=f"{where} param {name}")
            _assert_close(f"{where} exp_avg {name}", g["mu"][name], w["mu"][name],
                          rtol=1e-5, atol_scale=1e-5)
            _assert_close(f"{where} exp_avg_sq {name}", g["nu"][name], w["nu"][name],
                          rtol=1e-5, atol_scale=1e-5)
