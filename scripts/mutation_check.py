"""Break the code on purpose and show that the tests notice: a small mutation check.

    python scripts/mutation_check.py                  # every mutation, its targeted tests
    python scripts/mutation_check.py --only kv_swap   # one mutation
    python scripts/mutation_check.py --full           # the whole suite per mutation (slow)
    python scripts/mutation_check.py --list

Each mutation is one textual change to one file (a bug that would ruin a CPT run and that an
earlier suite missed). For each, the tracked and untracked files of the repository are copied to
a temporary folder, the change is applied there (never to the working tree), and pytest runs in
that copy with `-x` on the mutation's tests (or on everything with --full), with the copy first on
PYTHONPATH so that the tests and the scripts they start import the mutated package. A mutation is
"caught" when pytest fails; the table gives the first failing test and the time. The exit code is
0 when every mutation was caught, 1 when one was missed, 2 for bad usage or a mutation that no
longer applies (its text is not found exactly once: update MUTATIONS with the code).

docs/testing.md records the latest table.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import flags

from agpt_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One deliberate bug.

    Attributes:
        name: short id.
        what: the bug in words.
        path: the file changed, relative to the repository root.
        old: text that must occur exactly once in the file.
        new: its replacement.
        tests: the pytest node ids or files expected to catch it (run with -x).
    """

    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "no_microbatch_average", "gradients summed over the micro-batches, not averaged",
        "agpt_jax/train.py",
        "grads = jax.tree.map(lambda g: g / n, grad_sum)", "grads = grad_sum",
        ("tests/test_step_reference.py", "tests/test_train.py")),
    Mutation(
        "first_tile_only", "the converters' tiled transpose copies only the first 256 x 256 tile",
        "converters/megatron_layout.py",
        "    for i in range(0, m, _TILE):\n        for j in range(0, n, _TILE):",
        "    for i in range(0, min(m, _TILE), _TILE):\n        for j in range(0, min(n, _TILE), _TILE):",
        ("tests/converters/test_layouts.py", "tests/converters/test_universal_converters.py")),
    Mutation(
        "kv_swap", "k and v swapped when Megatron's fused QKV is split",
        "converters/megatron_layout.py",
        "    k = grouped[:, g]\n    v = grouped[:, g + 1]",
        "    k = grouped[:, g + 1]\n    v = grouped[:, g]",
        ("tests/converters/test_layouts.py", "tests/test_model_gqa.py",
         "tests/converters/test_universal_converters.py")),
    Mutation(
        "warmup_off_by_one", "the warmup ramp runs one iteration ahead (lr at k+1 for update k)",
        "agpt_jax/schedules.py",
        "        warm = cfg.init_lr + (max_lr - cfg.init_lr) * (kf / dtype(plan.warmup))",
        "        warm = cfg.init_lr + (max_lr - cfg.init_lr) * ((kf + 1) / dtype(plan.warmup))",
        ("tests/test_schedules.py", "tests/test_megatron_flags.py")),
    Mutation(
        "padded_vocab_dropped", "the padded vocabulary columns left out of the softmax",
        "agpt_jax/train.py",
        "    logits = model.apply({\"params\": params}, tokens)\n",
        "    logits = model.apply({\"params\": params}, tokens)[..., :model.config.vocab_size]\n",
        ("tests/test_step_reference.py", "tests/test_train.py")),
    Mutation(
        "weight_decay_on_norms", "weight decay applied to the RMSNorm scales (Megatron exempts 1-D)",
        "agpt_jax/optim.py",
        "        return rank >= 2 and (not names or names[-1] != \"bias\")",
        "        return rank >= 1 and (not names or names[-1] != \"bias\")",
        ("tests/test_step_reference.py", "tests/test_optim.py")),
    Mutation(
        "cooldown_default_0.2", "constant_cooldown cools down over 0.2 of the run, not the seed's 0.05",
        "configs/constant_cooldown.py",
        "MEGATRON_COOLDOWN_FRAC = 0.05", "MEGATRON_COOLDOWN_FRAC = 0.2",
        ("tests/test_megatron_flags.py", "tests/test_config.py")),
    Mutation(
        "warmup_fraction_read", "LR_WARMUP_FRACTION honoured although Megatron's launcher ignores it",
        "agpt_jax/recipes.py",
        "    if frac is not None:\n        return env_float(\"LR_WARMUP_FRAC\", default, environ)",
        "    frac = frac if frac is not None else fraction\n    if frac is not None:\n"
        "        return env_float(\"LR_WARMUP_FRAC\" if _env(environ, \"LR_WARMUP_FRAC\") else "
        "\"LR_WARMUP_FRACTION\", default, environ)",
        ("tests/test_megatron_flags.py", "tests/test_config.py")),
    Mutation(
        "zero_padding_kept", "a ZeRO rank's partition read whole, its padding as if it were data",
        "converters/zero_files.py",
        "        return min(max(self.n - r * self.size, 0), self.size)",
        "        return self.size if self.n > r * self.size else 0",
        ("tests/converters/test_zero_to_orbax.py",)),
    Mutation(
        "zero_fragment_offset", "a parameter cut by a ZeRO rank boundary assembled with every "
        "fragment at its start",
        "converters/zero.py",
        "open_[g][k][a - start:b - start] = rank.tensors[g][k][a - lo:b - lo]",
        "open_[g][k][:b - a] = rank.tensors[g][k][a - lo:b - lo]",
        ("tests/converters/test_zero_to_orbax.py",)),
)


class MutationError(ValueError):
    """A mutation no longer applies to the code."""


def checked_text(root: str, m: Mutation) -> str:
    """The text of m.path under `root`; MutationError unless `m.old` occurs in it exactly once."""
    with open(os.path.join(root, m.path)) as f:
        text = f.read()
    count = text.count(m.old)
    if count != 1:
        raise MutationError(f"{m.path}: mutation {m.name!r} expects its text once, found {count} "
                            "times; update MUTATIONS in scripts/mutation_check.py")
    return text


def apply_to(root: str, m: Mutation) -> None:
    """Applies `m` to the copy under `root` (MutationError if it no longer applies)."""
    text = checked_text(root, m)
    with open(os.path.join(root, m.path), "w") as f:
        f.write(text.replace(m.old, m.new))


def repository_files(root: str) -> list[str]:
    """Tracked and untracked, not ignored, files (the tree a clean clone would test)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    return [p for p in out.split("\0") if p and os.path.isfile(os.path.join(root, p))]


def copy_tree(src: str, dst: str) -> None:
    for rel in repository_files(src):
        target = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(src, rel), target)


@dataclasses.dataclass
class Result:
    mutation: Mutation
    caught: bool
    first_failure: str
    seconds: float
    tests_run: str


def run_one(m: Mutation, full: bool, workers: int, timeout: int) -> Result:
    with tempfile.TemporaryDirectory(prefix=f"mutation-{m.name}-") as tmp:
        copy_tree(ROOT, tmp)
        apply_to(tmp, m)
        env = dict(os.environ)
        env["PYTHONPATH"] = tmp + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        probe = subprocess.run([sys.executable, "-c", "import agpt_jax, converters; "
                                "print(agpt_jax.__file__, converters.__file__)"],
                               cwd=tmp, env=env, capture_output=True, text=True, check=True)
        if not all(p.startswith(tmp) for p in probe.stdout.split()):
            raise RuntimeError(f"the copy's packages are not the ones imported: {probe.stdout}")
        targets = [] if full else [t for t in m.tests if os.path.exists(
            os.path.join(tmp, t.split("::")[0]))]
        argv = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                "-n", str(workers), *targets]
        if not _has_torch():
            argv += ["-m", "not torch"]
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=timeout)
        seconds = time.perf_counter() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", proc.stdout, re.M)
    return Result(m, proc.returncode != 0, failed[0] if failed else
                  ("" if proc.returncode == 0 else f"pytest exit {proc.returncode}"), seconds,
                  "whole suite" if full else ", ".join(targets))


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def table(results: list[Result]) -> str:
    rows = ["| mutation | the bug | tests run | caught | first failing test | seconds |",
            "|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| `{r.mutation.name}` | {r.mutation.what} (`{r.mutation.path}`) | "
                    f"{r.tests_run} | {'yes' if r.caught else '**MISSED**'} | "
                    f"`{r.first_failure}` | {r.seconds:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_multi_string("only", [], "a mutation to run, by name (repeatable; default: all)",
                              flag_values=fv)
    flags.DEFINE_bool("full", False, "the whole suite per mutation", flag_values=fv)
    flags.DEFINE_bool("list", False, "list the mutations and exit", flag_values=fv)
    flags.DEFINE_integer("workers", 2, "pytest-xdist workers", short_name="n", flag_values=fv)
    flags.DEFINE_integer("timeout", 1800, "seconds per mutation", flag_values=fv)
    args = cli.parse(fv, argv, __doc__)
    names = {m.name for m in MUTATIONS}
    unknown = sorted(set(args.only) - names)
    if unknown:
        print(f"mutation_check: error: unknown mutation(s) {unknown}; --list shows them",
              file=sys.stderr)
        return 2
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:<24} {m.path:<32} {m.what}")
        return 0
    results = []
    for m in chosen:
        try:
            checked_text(ROOT, m)
        except MutationError as e:
            print(f"mutation_check: error: {e}", file=sys.stderr)
            return 2
        print(f"{m.name}: {m.what} ...", flush=True)
        r = run_one(m, args.full, args.workers, args.timeout)
        print(f"  {'caught by ' + r.first_failure if r.caught else 'MISSED'} ({r.seconds:.0f} s)",
              flush=True)
        results.append(r)
    print()
    print(table(results))
    return 0 if all(r.caught for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
