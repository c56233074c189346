"""The built-in demo: the whole CPT workflow on a CPU in minutes, from text every Python ships.

    python scripts/demo.py --out demo_out [--quick]

It runs AuroraGPT's two CPT recipes, each from the pretrained model it is meant for: the legacy
recipe (re-warm + cosine) continues a model pretrained with a cosine schedule; the constant LR +
cooldown recipe is phase 2 of a model pretrained at a constant LR (phase 1), continued at the same
LR with no re-warm and cooled down only at its end. Steps, each a call of the real entry point (the
equivalent command is printed):
   1. corpora       "papers" = the language reference topics of pydoc_data.topics, "web" = the
                    docstrings of the standard library's modules (read with ast, nothing imported)
   2. tokenizer     a SentencePiece BPE of 2048 pieces trained on both corpora
   3. preprocess    scripts/preprocess_data.py: both corpora -> Megatron .bin/.idx
   4. pretrain      scripts/cpt.py configs/pretrain.py:demo on "web", warmup + cosine to min_lr:
                    the "legacy pretrained model"
   5. phase 1       scripts/cpt.py configs/pretrain.py:demo on "web", same seed, data and LR,
                    warmup then constant LR, no cooldown, a checkpoint every third of the run
   6. export        converters.orbax_to_universal: the cosine model and phase 1's last checkpoint
                    (still at the peak LR) as Megatron-DeepSpeed universal checkpoints
   7. mix           scripts/mix_datasets.py: 0.9 papers + 0.1 web (replay)
   8. legacy CPT    scripts/cpt.py configs/legacy.py:demo from the cosine model's universal
                    checkpoint: re-warm + cosine on the mix
   9. phase 2       scripts/cpt.py configs/constant_cooldown.py:demo from phase 1's universal
                    checkpoint at phase 1's LR: no re-warm, constant, 1-sqrt cooldown at the end
  10. convert       both CPT results to a universal checkpoint and an HF Llama folder
  11. evaluate      scripts/evaluate.py: papers and web loss of both pretrained models and both
                    CPT results, each CPT result against the model it started from
  12. plot          scripts/plot_runs.py: loss per corpus and LR of the CPT runs side by side,
                    and of the two pretraining runs

The CPT runs read the universal checkpoints directly (scripts/cpt.py converts a universal LOAD
once into SAVE/converted_init/). Everything lands under --out (corpora/, tokenizer/, data/,
lists/, runs/, megatron/, hf/, eval/, cpt_runs.png, pretrain_runs.png, summary.json). `--quick`
is a smaller run of the same steps (for tests).

Over 400 lines on purpose: twelve short phases, each a function of the shared context, in the
order PHASES runs them.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import flags

from agpt_jax import cli, hostmem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MARKER = ".agpt-jax-demo"
VOCAB_SIZE = 2048  # the "demo" model preset's vocabulary
DOC_CHARS = 1500  # documents are cut at paragraph ends near this length
# Data split of every run and of the evaluation: 2% of the documents are held out for validation.
SPLIT = "98,2,0"
# Environment variables the run configs read as defaults (agpt_jax/recipes.py); the demo sets every
# value on the command line and clears these so a launcher environment cannot change the demo.
_LAUNCHER_ENV = (
    "SEQ", "DTYPE_COMPUTE", "DATA_FILE_LIST", "SPLIT", "SEED", "LOAD", "SAVE", "SAVE_INTERVAL",
    "TRAIN_TOKENS", "TRAIN_ITERS", "TRAIN_ITER", "MICRO_BATCH", "GRAD_ACC_STEPS", "GLOBAL_BATCH",
    "LR", "MIN_LR", "LR_DECAY_STYLE", "LR_WARMUP_FRAC", "LR_WARMUP_FRACTION", "LR_DECAY_ITERS",
    "ADAM_BETA1", "ADAM_BETA2", "ADAM_EPS", "WEIGHT_DECAY", "CLIP_GRAD", "TP", "EVAL_INTERVAL",
    "EVAL_ITERS", "LOG_INTERVAL")
# Standard-library folders that are tests, tools or third-party code rather than documented modules.
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3",
              "turtledemo", "pydoc_data", "__pycache__", "ensurepip", "tkinter", "config-3"}


class DemoError(RuntimeError):
    """A demo step failed; the message names the step and where its output is."""


@dataclasses.dataclass(frozen=True)
class DemoSizes:
    """Run lengths.

    Attributes:
        micro_batch: sequences of 128 tokens per iteration (one device, no accumulation).
        pretrain_iters: iterations of each pretraining run on "web" (a multiple of 3: phase 1
            saves a checkpoint every third of it).
        cpt_iters: iterations of each CPT run on the mix.
        eval_interval: iterations between evaluations in the runs.
        eval_iters: validation batches per evaluation (runs and the final evaluation).
        max_web_files: standard-library files read for "web" (None: all).
    """

    micro_batch: int
    pretrain_iters: int
    cpt_iters: int
    eval_interval: int
    eval_iters: int
    max_web_files: int | None = None


FULL = DemoSizes(micro_batch=16, pretrain_iters=90, cpt_iters=60, eval_interval=15,
                 eval_iters=4)
# 40 CPT iterations: a cooldown over the last 5% of the run still spans two iterations.
QUICK = DemoSizes(micro_batch=4, pretrain_iters=24, cpt_iters=40, eval_interval=20, eval_iters=1,
                  max_web_files=150)
# The peak LR of phase 1 and phase 2 (the constant+cooldown recipe continues at phase 1's LR), and
# of the cosine pretraining run so that the two pretrained models differ only in their schedule.
PRETRAIN_LR = 2e-3
PHASE1_SAVES = 3  # phase 1 saves every third of its run and keeps every save


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where every artifact goes under the output folder (all absolute)."""

    out: str
    corpora: str
    tokenizer_prefix: str
    tokenizer: str
    data: str
    lists: str
    web_list: str
    papers_list: str
    mix_list: str
    eval_list: str
    pretrain_run: str
    phase1_run: str
    legacy_run: str
    cc_run: str
    universal_cosine: str
    universal_phase1: str
    megatron: str
    hf: str
    eval: str
    plot: str
    pretrain_plot: str
    summary: str

    @classmethod
    def under(cls, out: str) -> Paths:
        out = os.path.abspath(out)
        j = lambda *parts: os.path.join(out, *parts)  # noqa: E731
        return cls(
            out=out, corpora=j("corpora"), tokenizer_prefix=j("tokenizer", "demo"),
            tokenizer=j("tokenizer", "demo.model"), data=j("data"), lists=j("lists"),
            web_list=j("lists", "web.txt"), papers_list=j("lists", "papers.txt"),
            mix_list=j("lists", "cpt_mix.txt"), eval_list=j("lists", "eval.txt"),
            pretrain_run=j("runs", "pretrain_cosine"), phase1_run=j("runs", "phase1_constant"),
            legacy_run=j("runs", "legacy"), cc_run=j("runs", "constant_cooldown"),
            universal_cosine=j("megatron", "pretrained_cosine"),
            universal_phase1=j("megatron", "phase1_constant"), megatron=j("megatron"),
            hf=j("hf"), eval=j("eval"), plot=j("cpt_runs.png"),
            pretrain_plot=j("pretrain_runs.png"), summary=j("summary.json"))


# ----------------------------------------------------------------------------------------------
# Step 1: corpora.


def chunk_text(text: str, max_chars: int = DOC_CHARS) -> list[str]:
    """Cut text into documents at paragraph ends, each at most ~max_chars (a longer paragraph is
    a document of its own)."""
    docs, current = [], ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        if current and len(current) + len(para) + 2 > max_chars:
            docs.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        docs.append(current)
    return docs


def papers_documents() -> Iterator[str]:
    """The language reference topics of pydoc_data.topics (what `help('topic')` shows)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield from chunk_text(topics[name])


def _stdlib_files(limit: int | None) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        files.extend(os.path.join(folder, n) for n in sorted(names) if n.endswith(".py"))
    return files[:limit] if limit else files


def module_documentation(path: str) -> str | None:
    """The docstrings of one module: the module's, then each public class and function's.

    Read with ast, so nothing is imported (some modules act on import). None when the file has
    no module docstring or cannot be parsed.
    """
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    doc = ast.get_docstring(tree)
    if not doc:
        return None
    parts = [doc]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not (
                node.name.startswith("_")):
            d = ast.get_docstring(node)
            if d:
                parts.append(f"{node.name}: {d}")
    return "\n\n".join(parts)


def web_documents(max_files: int | None = None) -> Iterator[str]:
    """Module documentation of the standard library's .py files, in path order."""
    for path in _stdlib_files(max_files):
        text = module_documentation(path)
        if text:
            yield from chunk_text(text)


def write_jsonl(path: str, documents: Iterator[str]) -> tuple[int, int]:
    """One {"text": ...} line per document; returns (documents, characters)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    n = chars = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}) + "\n")
            n += 1
            chars += len(doc)
    return n, chars


# ----------------------------------------------------------------------------------------------
# What the phases share, and how they call the entry points.


def load_script(name: str) -> types.ModuleType:
    """scripts/<name>.py as a module, so that a phase calls its `main(argv)` in this process.

    The scripts are not a package, so each is loaded by its path. It is registered in sys.modules
    (dataclasses look their module up while the class is created) under a private name, which
    shadows no module of the script's own name; a second call returns the same module.
    """
    key = f"_agpt_jax_demo_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(REPO, "scripts",
                                                                        name + ".py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


Main = Callable[[list[str]], int]


@dataclasses.dataclass(frozen=True)
class EntryPoints:
    """The entry points the phases call in this process, each a `main(argv) -> int`, and the one
    library function they use. All are imported before the first phase starts, so that no phase's
    time includes an import."""

    preprocess_data: Main
    mix_datasets: Main
    evaluate: Main
    plot_runs: Main
    orbax_to_universal: Main
    orbax_to_hf: Main
    resolve_checkpoint_dir: Callable[[str], str]

    @classmethod
    def load(cls) -> EntryPoints:
        import converters.orbax_to_hf as orbax_to_hf
        import converters.orbax_to_universal as orbax_to_universal

        evaluate = load_script("evaluate")
        mix_datasets = load_script("mix_datasets")
        plot_runs = load_script("plot_runs")
        preprocess_data = load_script("preprocess_data")
        from agpt_jax import checkpoint

        return cls(preprocess_data=preprocess_data.main, mix_datasets=mix_datasets.main,
                   evaluate=evaluate.main, plot_runs=plot_runs.main,
                   orbax_to_universal=orbax_to_universal.main, orbax_to_hf=orbax_to_hf.main,
                   resolve_checkpoint_dir=checkpoint.resolve_checkpoint_dir)


@dataclasses.dataclass
class Context:
    """Everything a phase reads: where each artifact goes, the run sizes, the entry points; and
    what earlier phases leave for later ones (filled in as the phases run)."""

    paths: Paths
    sizes: DemoSizes
    tools: EntryPoints
    corpora: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> .jsonl
    prefixes: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> .bin/.idx prefix
    # Phase 1's last checkpoint (RUN/checkpoints/<step>), the one phase 2 continues: its "dir",
    # "step" and "lr".
    phase1: dict[str, Any] = dataclasses.field(default_factory=dict)
    # evaluate.py's results per model key ("pretrained_cosine", "legacy", "phase1", ...).
    results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    times: list[tuple[str, float]] = dataclasses.field(default_factory=list)  # (title, seconds)


def call(what: str, main: Main, argv: list[str], command: str) -> str:
    """Call a script's `main(argv)` in this process; returns its stdout (also echoed)."""
    print(f"      $ {command} {shlex.join(argv)}", flush=True)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    text = buf.getvalue()
    if rc != 0:
        sys.stdout.write(text)
        raise DemoError(f"{what}: {command} exited with {rc} (its error is above)")
    return text


def cpt(what: str, config: str, overrides: dict[str, Any], log: str) -> None:
    """Run scripts/cpt.py in a subprocess (a training run is its own process, as for users)."""
    argv = [os.path.join(REPO, "scripts", "cpt.py"), f"--config={config}"]
    argv += [f"--config.{k}={v}" for k, v in overrides.items()]
    argv += ["--num_cpu_devices=1"]
    print(f"      $ python {shlex.join(argv)}", flush=True)
    print(f"      (log: {log})", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    # One CPU device: the demo's batch of 16 sequences is one micro-batch on one device.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, stdout=f,
                              stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read().splitlines()[-15:]
        raise DemoError(f"{what}: scripts/cpt.py exited with {proc.returncode}; last lines "
                        f"of {log}:\n" + "\n".join(tail))


def _last_metrics(run_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The last train line and the last eval line of a run's metrics.jsonl."""
    train, ev = {}, {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                train = rec
            elif "eval/loss" in rec:
                ev = rec
    return train, ev


def _first_metrics(run_dir: str) -> dict[str, Any]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                return rec
    return {}


def _describe_run(run_dir: str) -> list[str]:
    first, (last, ev) = _first_metrics(run_dir), _last_metrics(run_dir)
    lines = [f"run folder {run_dir} (config.json, metrics.jsonl, lr_schedule.csv, checkpoints/)",
             f"iterations {last.get('iteration')}, tokens {last.get('tokens')}: train loss "
             f"{first.get('loss', float('nan')):.3f} -> {last.get('loss', float('nan')):.3f}, "
             f"final lr {last.get('lr', float('nan')):.2e}, {last.get('tokens_per_s', 0):.0f} "
             f"tokens/s"]
    if ev:
        per = ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in sorted(ev.items())
                        if k.startswith("eval/loss/"))
        lines.append(f"last eval loss {ev['eval/loss']:.3f} ({per})")
    return lines


def _lr_at(run_dir: str, iteration: int) -> float:
    """The LR of a run's train step `iteration` (metrics.jsonl)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec and rec["iteration"] == iteration:
                return float(rec["lr"])
    raise DemoError(f"{run_dir}/metrics.jsonl: no train line for iteration {iteration}")


def _run_overrides(sizes: DemoSizes) -> dict[str, Any]:
    """The --config.* values every run shares."""
    return {"split": SPLIT, "eval_interval": sizes.eval_interval,
            "eval_iters": sizes.eval_iters, "train_tokens": 0, "global_batch": 0,
            "micro_batch": sizes.micro_batch, "grad_acc_steps": 1, "progress_bar": False,
            "log_interval": 10}


def _pretrain_overrides(ctx: Context) -> dict[str, Any]:
    # Both pretraining runs: random init, the same seed, data and peak LR; only the schedule
    # differs.
    return dict(_run_overrides(ctx.sizes), data_file_list=ctx.paths.web_list,
                train_iters=ctx.sizes.pretrain_iters, lr=PRETRAIN_LR)


def _cpt_overrides(ctx: Context) -> dict[str, Any]:
    """The --config.* values both CPT runs share."""
    return dict(_run_overrides(ctx.sizes), data_file_list=ctx.paths.mix_list,
                train_iters=ctx.sizes.cpt_iters, save_interval=ctx.sizes.cpt_iters)


def _evaluated_models(ctx: Context) -> tuple[tuple[str, str, str | None], ...]:
    # (title, results key, checkpoint); each CPT result follows the model it started from.
    p = ctx.paths
    return (("cosine pretrained", "pretrained_cosine", p.pretrain_run),
            ("  legacy CPT", "legacy", p.legacy_run),
            ("phase 1 (constant LR)", "phase1", None),
            ("  phase 2 (const+cool)", "constant_cooldown", p.cc_run))


# ----------------------------------------------------------------------------------------------
# The phases, in the order they run; each returns the lines describing its outputs.


def make_corpora(ctx: Context) -> list[str]:
    lines = []
    for name, docs in (("papers", papers_documents()),
                       ("web", web_documents(ctx.sizes.max_web_files))):
        path = os.path.join(ctx.paths.corpora, f"{name}.jsonl")
        n, chars = write_jsonl(path, docs)
        ctx.corpora[name] = path
        lines.append(f"{name}: {n} documents, {chars / 1e3:.0f}K characters -> {path}")
    return lines


def train_tokenizer(ctx: Context) -> list[str]:
    import sentencepiece as spm

    p = ctx.paths
    os.makedirs(os.path.dirname(p.tokenizer_prefix), exist_ok=True)
    text = os.path.join(p.corpora, "tokenizer_train.txt")
    with open(text, "w", encoding="utf-8") as f:
        for path in ctx.corpora.values():
            with open(path, encoding="utf-8") as src:
                for line in src:
                    f.write(json.loads(line)["text"] + "\n")
    print("      SentencePiece BPE, Llama's special ids: unk 0, <s> 1, </s> 2", flush=True)
    spm.SentencePieceTrainer.train(
        input=text, model_prefix=p.tokenizer_prefix, vocab_size=VOCAB_SIZE, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        input_sentence_size=200_000, shuffle_input_sentence=True, num_threads=2,
        minloglevel=2)
    os.remove(text)
    return [f"vocabulary {VOCAB_SIZE} -> {p.tokenizer}"]


def tokenize_corpora(ctx: Context) -> list[str]:
    p = ctx.paths
    lines = []
    for name, path in ctx.corpora.items():
        argv = ["--input", path, "--output-prefix", os.path.join(p.data, name),
                "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", p.tokenizer,
                "--append-eod", "--log-interval", "100000"]
        text = call(f"preprocess {name}", ctx.tools.preprocess_data, argv,
                    "python scripts/preprocess_data.py")
        ctx.prefixes[name] = os.path.join(p.data, f"{name}_text_document")
        lines.append(f"{name}: {text.splitlines()[0].strip()}")
        lines.append(f"  -> {ctx.prefixes[name]}.bin / .idx")
    os.makedirs(p.lists, exist_ok=True)
    for name, list_path in (("web", p.web_list), ("papers", p.papers_list)):
        with open(list_path, "w") as f:
            f.write(f"1.0 {ctx.prefixes[name]} {name}\n")
        lines.append(f"DATA_FILE_LIST {list_path}")
    with open(p.eval_list, "w") as f:
        f.write(f"1.0 {ctx.prefixes['papers']} papers\n1.0 {ctx.prefixes['web']} web\n")
    return lines


def pretrain_cosine(ctx: Context) -> list[str]:
    p = ctx.paths
    cpt("pretrain (cosine)", "configs/pretrain.py:demo",
        dict(_pretrain_overrides(ctx), save=p.pretrain_run, save_interval=ctx.sizes.pretrain_iters),
        p.pretrain_run + ".log")
    return _describe_run(p.pretrain_run)


def pretrain_phase1(ctx: Context) -> list[str]:
    p = ctx.paths
    every = ctx.sizes.pretrain_iters // PHASE1_SAVES
    cpt("phase 1 (constant LR)", "configs/pretrain.py:demo",
        dict(_pretrain_overrides(ctx), save=p.phase1_run, lr_decay_style="constant",
             cooldown_frac=0, save_interval=every, keep_checkpoints=PHASE1_SAVES),
        p.phase1_run + ".log")
    steps = sorted(int(n) for n in os.listdir(os.path.join(p.phase1_run, "checkpoints"))
                   if n.isdigit())
    # The run's newest finalized checkpoint is its last save; name the step folder itself.
    phase1 = ctx.phase1
    phase1["dir"] = ctx.tools.resolve_checkpoint_dir(p.phase1_run)
    phase1["step"] = int(os.path.basename(phase1["dir"]))
    phase1["lr"] = _lr_at(p.phase1_run, phase1["step"])
    return _describe_run(p.phase1_run) + [
        f"checkpoints at iterations {steps}; phase 2 continues the last one, "
        f"{phase1['dir']} (LR {phase1['lr']:.2e}, never decayed)"]


def export_pretrained(ctx: Context) -> list[str]:
    p = ctx.paths
    os.makedirs(p.megatron, exist_ok=True)
    lines = []
    for what, src, dst in (("cosine pretrained model", p.pretrain_run, p.universal_cosine),
                           ("phase 1, last checkpoint", ctx.phase1["dir"], p.universal_phase1)):
        call("export", ctx.tools.orbax_to_universal, ["--load", src, "--save", dst],
             "python -m converters.orbax_to_universal")
        lines.append(f"{what}: universal checkpoint (DeepSpeed ds_to_universal layout) "
                     f"-> {dst}")
    return lines


def mix_cpt_data(ctx: Context) -> list[str]:
    p = ctx.paths
    text = call("mix", ctx.tools.mix_datasets,
                ["--inputs", "0.9", p.papers_list, "0.1", p.web_list],
                "python scripts/mix_datasets.py")
    with open(p.mix_list, "w") as f:
        f.write(text)
    return [f"0.9 papers + 0.1 web replay -> {p.mix_list}"] + [
        "  " + line for line in text.splitlines()]


def legacy_cpt(ctx: Context) -> list[str]:
    p = ctx.paths
    cpt("legacy CPT", "configs/legacy.py:demo",
        dict(_cpt_overrides(ctx), load=p.universal_cosine, save=p.legacy_run),
        p.legacy_run + ".log")
    return [f"LOAD {p.universal_cosine}, converted once into "
            f"{os.path.join(p.legacy_run, 'converted_init')}"] + _describe_run(p.legacy_run)


def phase2_cpt(ctx: Context) -> list[str]:
    p = ctx.paths
    # Phase 1's peak LR; the recipe's own cooldown length and min_lr apply.
    cpt("phase 2 (constant+cooldown CPT)", "configs/constant_cooldown.py:demo",
        dict(_cpt_overrides(ctx), load=p.universal_phase1, save=p.cc_run, lr=PRETRAIN_LR),
        p.cc_run + ".log")
    return [f"LOAD {p.universal_phase1}, converted once into "
            f"{os.path.join(p.cc_run, 'converted_init')}"] + _describe_run(p.cc_run)


def convert_cpt_results(ctx: Context) -> list[str]:
    p = ctx.paths
    lines = []
    for name, run in (("legacy", p.legacy_run), ("constant_cooldown", p.cc_run)):
        meg = os.path.join(p.megatron, name)
        hf = os.path.join(p.hf, name)
        os.makedirs(p.hf, exist_ok=True)
        call(f"convert {name}", ctx.tools.orbax_to_universal, ["--load", run, "--save", meg],
             "python -m converters.orbax_to_universal")
        call(f"convert {name}", ctx.tools.orbax_to_hf,
             ["--load", run, "--save", hf, "--tokenizer", p.tokenizer],
             "python -m converters.orbax_to_hf")
        lines += [f"{name}: Megatron universal -> {meg}", f"{name}: HF Llama -> {hf}"]
    return lines


def evaluate_models(ctx: Context) -> list[str]:
    p, sizes = ctx.paths, ctx.sizes
    models = _evaluated_models(ctx)
    os.makedirs(p.eval, exist_ok=True)
    for _, key, ckpt in models:
        out_json = os.path.join(p.eval, f"{key}.json")
        call(f"evaluate {key}", ctx.tools.evaluate,
             ["--checkpoint", ckpt or ctx.phase1["dir"], "--data-file-list", p.eval_list,
              "--split", "valid", "--data-split", SPLIT, "--global-batch-size", "16",
              "--eval-iters", str(2 * sizes.eval_iters), "--json", out_json],
             "python scripts/evaluate.py")
        with open(out_json) as f:
            ctx.results[key] = json.load(f)["results"]
    lines = [f"validation documents ({SPLIT} split) of each corpus, "
             f"{2 * sizes.eval_iters * 16} samples; loss in nats/token (perplexity):",
             f"{'model':<24}{'papers':>18}{'web':>18}"]
    for title, key, _ in models:
        r = ctx.results[key]
        lines.append(f"{title:<24}" + "".join(
            f"{r[c]['loss']:>9.3f} ({r[c]['perplexity']:>6.1f})" for c in ("papers", "web")))
    lines.append(f"per-model JSON in {p.eval}")
    return lines


def plot_all_runs(ctx: Context) -> list[str]:
    p = ctx.paths
    lines = []
    for runs, png, title in (
            ([p.legacy_run, p.cc_run], p.plot,
             "CPT on 0.9 papers + 0.1 web: legacy (from cosine) and phase 2 (from phase 1)"),
            ([p.pretrain_run, p.phase1_run], p.pretrain_plot,
             "pretraining on web: cosine and constant LR (phase 1)")):
        text = call("plot", ctx.tools.plot_runs,
                    [*runs, "--out", png, "--smooth", "5", "--title", title],
                    "python scripts/plot_runs.py")
        lines += text.splitlines()
    return lines


@dataclasses.dataclass(frozen=True)
class Phase:
    """One demo step: its short name (the module docstring's list), the title its report line
    prints, and the function that runs it."""

    name: str
    title: str
    run: Callable[[Context], Sequence[str]]


PHASES = (
    Phase("corpora", "Build two corpora from the Python installation", make_corpora),
    Phase("tokenizer", "Train a tokenizer", train_tokenizer),
    Phase("preprocess", "Tokenize both corpora into Megatron .bin/.idx", tokenize_corpora),
    Phase("pretrain", "Pretrain the 'legacy pretrained model' on 'web' (warmup + cosine)",
          pretrain_cosine),
    Phase("phase 1", "Pretrain phase 1 on 'web' (warmup + constant LR, no cooldown)",
          pretrain_phase1),
    Phase("export", "Export both as Megatron universal checkpoints", export_pretrained),
    Phase("mix", "Mix the CPT data: 0.9 papers + 0.1 web", mix_cpt_data),
    Phase("legacy CPT", "Legacy CPT from the cosine model: re-warm + cosine on the mix",
          legacy_cpt),
    Phase("phase 2", "Phase 2 from phase 1: constant LR + cooldown on the mix, no re-warm",
          phase2_cpt),
    Phase("convert", "Convert the CPT results to Megatron and HF form", convert_cpt_results),
    Phase("evaluate", "Evaluate papers and web loss before and after CPT", evaluate_models),
    Phase("plot", "Plot the runs", plot_all_runs),
)


# ----------------------------------------------------------------------------------------------
# Runner.


def run_phases(ctx: Context, phases: Sequence[Phase] = PHASES) -> None:
    """Runs the phases in order, printing what each did, where, and how long it took."""
    for n, phase in enumerate(phases, start=1):
        print(f"\n[{n}/{len(phases)}] {phase.title}", flush=True)
        start = time.perf_counter()
        lines = phase.run(ctx)
        seconds = time.perf_counter() - start
        ctx.times.append((phase.title, seconds))
        for line in lines:
            print(f"      {line}")
        print(f"      done in {seconds:.1f} s", flush=True)


def write_summary(ctx: Context, total: float) -> dict[str, Any]:
    """Writes OUT/summary.json and prints the summary; returns what it wrote."""
    p, results, phase1 = ctx.paths, ctx.results, ctx.phase1
    summary = {
        "out": p.out, "sizes": dataclasses.asdict(ctx.sizes), "seconds_total": total,
        "steps": [{"step": t, "seconds": s} for t, s in ctx.times],
        "loss": {k: {c: results[k][c]["loss"] for c in ("papers", "web", "total")}
                 for k in results},
        "phase1_checkpoint": {"dir": phase1["dir"], "iteration": phase1["step"],
                              "lr": phase1["lr"]},
        "paths": {"tokenizer": p.tokenizer, "mix_list": p.mix_list, "runs": [
            p.pretrain_run, p.phase1_run, p.legacy_run, p.cc_run],
            "universal_cosine": p.universal_cosine, "universal_phase1": p.universal_phase1,
            "megatron": p.megatron, "hf": p.hf, "plot": p.plot,
            "pretrain_plot": p.pretrain_plot},
    }
    with open(p.summary, "w") as f:
        json.dump(summary, f, indent=1)
    print("\nSummary")
    for title, s in ctx.times:
        print(f"  {s:7.1f} s  {title}")
    print(f"  {total:7.1f} s  total")
    for branch, before, after in (("legacy CPT", "pretrained_cosine", "legacy"),
                                  ("phase 2", "phase1", "constant_cooldown")):
        b, a = results[before], results[after]
        change = a["web"]["loss"] - b["web"]["loss"]
        note = (f"forgetting +{change:.3f}, held back by the 10% replay" if change > 0
                else "no forgetting at this length")
        print(f"  {branch + ':':<12} papers {b['papers']['loss']:.3f} -> "
              f"{a['papers']['loss']:.3f} (learning the new corpus), web "
              f"{b['web']['loss']:.3f} -> {a['web']['loss']:.3f} ({note}); from {before}")
    print(f"  plots {p.plot}, {p.pretrain_plot}; summary {p.summary}")
    return summary


def run_demo(out: str, sizes: DemoSizes) -> dict[str, Any]:
    """All phases; returns the summary also written to OUT/summary.json."""
    ctx = Context(paths=Paths.under(out), sizes=sizes, tools=EntryPoints.load())
    t_start = time.perf_counter()
    run_phases(ctx)
    return write_summary(ctx, time.perf_counter() - t_start)


def prepare_out(out: str, overwrite: bool) -> None:
    """Create OUT; an existing non-empty OUT must be an earlier demo's and --overwrite given."""
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(os.path.join(out, MARKER)):
            raise DemoError(f"--out {out}: exists, is not empty and was not written by the demo; "
                            "choose a new folder")
        if not overwrite:
            raise DemoError(f"--out {out}: holds an earlier demo; pass --overwrite to replace it "
                            "or choose a new folder")
        shutil.rmtree(out)
    elif os.path.exists(out) and not os.path.isdir(out):
        raise DemoError(f"--out {out}: is a file; choose a folder")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, MARKER), "w") as f:
        f.write("written by scripts/demo.py\n")


def main(argv: Sequence[str] | None = None) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("out", None, "folder for everything the demo writes", required=True,
                        flag_values=fv)
    flags.DEFINE_bool("quick", False, "shorter runs (a smoke test, ~1 min)", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace an earlier demo's --out", flag_values=fv)
    args = cli.parse(fv, argv, __doc__)
    sizes = QUICK if args.quick else FULL
    try:
        prepare_out(args.out, args.overwrite)
        run_demo(args.out, sizes)
    except DemoError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # First: glibc reads its tunables only at start-up (agpt_jax/hostmem.py); this may re-execute.
    hostmem.reexec_with_huge_pages()
    sys.exit(main())
