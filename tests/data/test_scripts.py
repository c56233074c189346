"""preprocess_data.py, mix_datasets.py and inspect_data.py, driven through their main(argv)."""

import dataclasses
import gzip
import json
import os

import numpy as np
import pytest

from agpt_jax.data.blend import BlendConfig, build_blended_splits
from agpt_jax.data.file_list import read_file_list
from agpt_jax.data.indexed import IndexedDataset

from script_modules import load_script


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "aurora", "tensor", "jax", "corpus", "token", "model",
             "paper", "replay", "cosine", "warmup", "batch", "sample", "shard", "mesh"]
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 25)))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("sp")
    (d / "train.txt").write_text("\n".join(_texts(300)))
    spm.SentencePieceTrainer.train(input=str(d / "train.txt"), model_prefix=str(d / "tok"), vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    return str(d / "tok.model")


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_texts(300), trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<|endoftext|>"]))
    tok.save(str(d / "tokenizer.json"))
    return str(d / "tokenizer.json")


def _write_jsonl(path, texts, opener=open):
    with opener(path, "wt") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")


def test_sentencepiece_bos_and_eod(tmp_path, sp_model):
    import sentencepiece as spm
    texts = _texts(40, seed=1)
    _write_jsonl(tmp_path / "in.jsonl.gz", texts, opener=gzip.open)
    pre = load_script("preprocess_data")
    rc = pre.main(["--input", str(tmp_path / "in.jsonl.gz"), "--output-prefix", str(tmp_path / "out"),
                   "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", sp_model, "--append-eod",
                   "--workers", "2"])
    assert rc == 0
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds.dtype == np.uint16 and len(ds) == len(texts)
    for i, t in enumerate(texts):
        assert ds[i].tolist() == [sp.bos_id()] + sp.encode(t) + [sp.eos_id()]


def test_hf_tokenizer_zstd_and_malformed_lines(tmp_path, hf_json, capsys):
    import zstandard
    from tokenizers import Tokenizer
    texts = _texts(20, seed=2)
    lines = [json.dumps({"text": t}) for t in texts]
    lines.insert(3, "{not json")
    lines.insert(7, json.dumps({"body": "no text key"}))
    raw = ("\n".join(lines) + "\n").encode()
    (tmp_path / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pre = load_script("preprocess_data")
    args = ["--input", str(tmp_path / "in.jsonl.zst"), "--output-prefix", str(tmp_path / "hf"),
            "--tokenizer-type", "HFTokenizer", "--tokenizer-model", hf_json, "--append-eod"]
    assert pre.main(args) == 2
    err = capsys.readouterr().err
    assert "in.jsonl.zst:4: invalid JSON" in err and "--skip-malformed" in err
    assert not os.path.exists(str(tmp_path / "hf_text_document.idx"))
    assert pre.main(args + ["--skip-malformed"]) == 0
    err = capsys.readouterr().err
    assert ":4: invalid JSON" in err and ":8: missing key 'text'" in err
    tok = Tokenizer.from_file(hf_json)
    eod = tok.token_to_id("<|endoftext|>")
    ds = IndexedDataset(str(tmp_path / "hf_text_document"))
    assert len(ds) == len(texts)
    for i, t in enumerate(texts):
        assert ds[i].tolist() == tok.encode(t).ids + [eod]


@pytest.mark.parametrize("case", ["missing", "truncated_gz", "not_gzip", "damaged_zst",
                                  "not_utf8", "prefix_under_a_file"])
def test_preprocess_bad_input_exits_2_naming_the_file(tmp_path, sp_model, capsys, case):
    """Every input the user must fix exits 2 with one line naming it; no output file is left."""
    body = "".join(json.dumps({"text": t}) + "\n" for t in _texts(200, seed=5)).encode()
    inp, prefix = tmp_path / "in.jsonl", tmp_path / "out" / "p"
    if case == "truncated_gz":
        inp = tmp_path / "in.jsonl.gz"
        inp.write_bytes(gzip.compress(body)[:200])
        needle = f"--input {inp}: cannot be read after line"
    elif case == "not_gzip":
        inp = tmp_path / "in.jsonl.gz"
        inp.write_bytes(body)
        needle = f"--input {inp}: cannot be read after line 0 (BadGzipFile"
    elif case == "damaged_zst":
        inp = tmp_path / "in.jsonl.zst"
        inp.write_bytes(b"garbage" * 20)
        needle = f"--input {inp}: cannot be read after line 0 (ZstdError"
    elif case == "not_utf8":
        inp.write_bytes(body.split(b"\n")[0] + b"\n" + b'{"text": "\xff\xfe"}\n')
        needle = f"--input {inp}: line 2 is not UTF-8 text"
    elif case == "prefix_under_a_file":
        inp.write_bytes(body)
        (tmp_path / "a_file").write_text("x")
        prefix = tmp_path / "a_file" / "p"
        needle = f"--output-prefix '{prefix}': its folder {tmp_path / 'a_file'} cannot be created"
    else:
        inp = tmp_path / "nothing.jsonl"
        needle = f"--input '{inp}' does not exist"
    before = sorted(os.listdir(tmp_path))
    pre = load_script("preprocess_data")
    capsys.readouterr()
    assert pre.main(["--input", str(inp), "--output-prefix", str(prefix), "--tokenizer-type",
                     "Llama2Tokenizer", "--tokenizer-model", sp_model]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    left = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files
            if f.endswith((".bin", ".idx"))]
    assert left == [] and set(os.listdir(tmp_path)) - set(before) <= {"out"}, left


def test_mix_datasets_output_and_rounding_warning(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("3 /d/p1 papers\n1 /d/p2 papers\n")
    (tmp_path / "b.txt").write_text("1 /d/big dolma\n0.0000001 /d/tiny dolma\n")
    mix = load_script("mix_datasets")
    assert mix.main(["--inputs", "0.9", str(tmp_path / "a.txt"), "0.1", str(tmp_path / "b.txt")]) == 0
    out, err = capsys.readouterr()
    rows = [line.split() for line in out.strip().splitlines()]
    b_sum = 1 + 0.0000001
    expect = [(3 / 4) * 0.9, (1 / 4) * 0.9, (1 / b_sum) * 0.1, (0.0000001 / b_sum) * 0.1]
    assert [r[0] for r in rows] == [f"{w:.6f}" for w in expect]
    assert [r[1:] for r in rows] == [["/d/p1", "papers"], ["/d/p2", "papers"], ["/d/big", "dolma"], ["/d/tiny", "dolma"]]
    assert "/d/tiny" in err and "0.000000" in err
    assert mix.main(["--inputs", "0.9", str(tmp_path / "a.txt"), "0.1", str(tmp_path / "b.txt"),
                     "--precision", "12"]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines()[3].split()[0] == f"{expect[3]:.12f}"
    assert mix.main(["--inputs", str(tmp_path / "a.txt"), "0.9"]) == 2


def test_inspect_data_dump_matches_blend(tmp_path, sp_model, capsys):
    pre = load_script("preprocess_data")
    for name, seed in (("web", 3), ("code", 4)):
        _write_jsonl(tmp_path / f"{name}.jsonl", _texts(120, seed=seed))
        assert pre.main(["--input", str(tmp_path / f"{name}.jsonl"), "--output-prefix", str(tmp_path / name),
                         "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", sp_model,
                         "--append-eod"]) == 0
    (tmp_path / "list.txt").write_text("0.7 web_text_document web\n0.3 code_text_document code\n")
    capsys.readouterr()
    ins = load_script("inspect_data")
    flags = ["--data-file-list", str(tmp_path / "list.txt"), "--seq-length", "32", "--global-batch-size", "4",
             "--train-iters", "10", "--eval-interval", "5", "--eval-iters", "1", "--split", "90,10,0",
             "--shuffle-sample-in-corpus"]
    assert ins.main(flags + ["--dump", "3", "--out", str(tmp_path / "b.npz"), "--decode", sp_model]) == 0
    out = capsys.readouterr().out
    assert "[train]" in out and "[valid]" in out and "--- iteration 2 row 3 [" in out
    z = np.load(tmp_path / "b.npz")
    assert z["tokens"].shape == (12, 33) and z["tokens"].dtype == np.int64
    cfg = BlendConfig(seq_length=32, global_batch_size=4, train_iters=10, eval_interval=5, eval_iters=1,
                      split="90,10,0", shuffle_sample_in_corpus=True)
    train = build_blended_splits(read_file_list(str(tmp_path / "list.txt")), cfg)["train"]
    assert list(z["corpora"]) == ["code", "web"]
    for row in range(12):
        tokens, c = train[row]
        np.testing.assert_array_equal(z["tokens"][row], tokens)
        assert z["corpus"][row] == c
    (tmp_path / "bad.txt").write_text("0.7 nowhere web\n")
    assert ins.main(["--data-file-list", str(tmp_path / "bad.txt")] + flags[2:]) == 2
    assert "line 1: missing" in capsys.readouterr().err


def _training_blend_keywords(recipe_config) -> dict:
    """The sample-in-corpus options agpt_jax/loop.py builds the training blend with: the recipe
    config's keys it forwards (cfg.data.<key>), a constant, or BlendConfig's default."""
    import ast
    import inspect

    from agpt_jax import loop

    calls = [n for n in ast.walk(ast.parse(inspect.getsource(loop)))
             if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "BlendConfig"]
    assert len(calls) == 1, "loop.py builds the training blend in one place"
    given = {k.arg: k.value for k in calls[0].keywords}
    defaults = {f.name: f.default for f in dataclasses.fields(BlendConfig)}
    out = {}
    for name in ("shuffle_sample_in_corpus", "blend_sample_in_corpus"):
        value = given.get(name)
        if value is None:
            out[name] = defaults[name]
        elif isinstance(value, ast.Constant):
            out[name] = value.value
        else:
            assert ast.unparse(value) == f"cfg.data.{name}", (
                f"loop.py passes {name}={ast.unparse(value)}: make inspect_data's default follow it")
            out[name] = bool(recipe_config[name])
    return out


@pytest.mark.parametrize("recipe", ["pretrain", "legacy", "cooldown", "constant_cooldown"])
def test_inspect_data_defaults_are_the_training_blend(tmp_path, monkeypatch, capsys, recipe):
    """With only the list, seq, GBS and iterations, inspect_data builds the BlendConfig a 7B
    recipe trains on: the config's split, eval interval/iters, seed and in-corpus options."""
    import importlib

    for var in ("SPLIT", "EVAL_ITERS", "EVAL_INTERVAL", "SEED"):
        monkeypatch.delenv(var, raising=False)
    c = importlib.import_module(f"configs.{recipe}").get_config("agpt_7b")
    expected = BlendConfig(seq_length=64, global_batch_size=8, train_iters=30,
                           eval_interval=c.eval_interval, eval_iters=c.eval_iters, seed=c.seed,
                           split=c.split, **_training_blend_keywords(c))
    ins = load_script("inspect_data")
    built = []

    def capture(entries, cfg):
        built.append(cfg)
        return {}

    monkeypatch.setattr(ins, "read_file_list", lambda path: [])
    monkeypatch.setattr(ins, "build_blended_splits", capture)
    monkeypatch.setattr(ins, "describe", lambda splits, entries, cfg: "")
    assert ins.main(["--data-file-list", str(tmp_path / "list.txt"), "--seq-length", "64",
                     "--global-batch-size", "8", "--train-iters", "30"]) == 0
    assert built == [expected]
    # The flags still override every default.
    built.clear()
    assert ins.main(["--data-file-list", "x", "--seq-length", "64", "--global-batch-size", "8",
                     "--train-iters", "30", "--split", "969, 30, 1", "--eval-interval", "1000",
                     "--eval-iters", "100", "--seed", "7",
                     "--no-shuffle-sample-in-corpus" if expected.shuffle_sample_in_corpus
                     else "--shuffle-sample-in-corpus", "--blend-sample-in-corpus"]) == 0
    assert built == [dataclasses.replace(
        expected, split="969, 30, 1", eval_interval=1000, eval_iters=100, seed=7,
        shuffle_sample_in_corpus=not expected.shuffle_sample_in_corpus,
        blend_sample_in_corpus=True)]


def test_inspect_data_bad_input_exits_2_naming_it(tmp_path, capsys):
    ins = load_script("inspect_data")
    flags = ["--seq-length", "32", "--global-batch-size", "4", "--train-iters", "10"]
    missing = tmp_path / "no_list.txt"
    assert ins.main(["--data-file-list", str(missing)] + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(missing) in err[0], err
    out = tmp_path / "no_folder" / "b.npz"
    assert ins.main(["--data-file-list", str(missing), "--dump", "1", "--out", str(out)]
                    + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {out}: the folder {out.parent} does not exist" in err[0], err
