"""Tokenize jsonl (optionally .gz / .zst) into Megatron `.bin/.idx` files.

The counterpart of Megatron-DeepSpeed's `tools/preprocess_data.py`: one document per json line, the
text of every `--json-keys` key tokenized (Llama2Tokenizer prepends BOS), `--append-eod` appends the
end-of-document id, and the output is `{output_prefix}_{key}_document.bin/.idx`. Unlike the fork, the
appended EOD is counted in the index sizes (spec/megatron-deepspeed.md §8).

    python scripts/preprocess_data.py --input docs.jsonl.zst --output-prefix out/papers \\
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --append-eod --workers 8

Exit codes: 0 written; 2 bad input (a missing, unreadable or malformed --input, tokenizer or flag;
the message names the file and line); 1 writing the outputs failed (their partial files are
removed).
"""

from __future__ import annotations

import gzip
import io
import multiprocessing
import os
import sys
import time
import types
from collections.abc import Iterator

from absl import flags
from tqdm import tqdm

from agpt_jax import cli
from agpt_jax.data.indexed import DataError, IndexedDatasetBuilder, best_fitting_dtype
from agpt_jax.data.tokenizer import TOKENIZER_TYPES, encode_json_line, init_encoder, load_tokenizer

def open_binary(path: str) -> io.BufferedIOBase:
    """Opens a file for reading bytes, decompressing `.gz` and `.zst` by suffix."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def open_text(path: str) -> io.TextIOBase:
    """Opens a text file, decompressing `.gz` and `.zst` by suffix."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8")


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged input raises: OSError (gzip.BadGzipFile), EOFError (a truncated
    .gz), zstandard.ZstdError (a damaged .zst)."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _numbered_lines(path: str) -> Iterator[tuple[int, str]]:
    """The non-blank lines of `path` (decoded as UTF-8) with their 1-based numbers.

    Raises:
        DataError: the file cannot be read or decompressed, or a line is not UTF-8 (names the
            file and the line).
    """
    lineno = 0
    try:
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"--input {path}: line {lineno} is not UTF-8 text (byte "
                                    f"{e.start}: {e.reason}); convert the file to UTF-8") from None
                if line.strip():
                    yield lineno, line
    except _read_errors() as e:
        raise DataError(f"--input {path}: cannot be read after line {lineno} "
                        f"({type(e).__name__}: {e}); is it a complete .jsonl, .jsonl.gz or "
                        ".jsonl.zst file?") from None


def parse_args(argv: list[str] | None) -> types.SimpleNamespace:
    """The flags of `argv` (sys.argv[1:] when None); a bad flag exits 2 (agpt_jax/cli.py)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("input", None, "jsonl file (.jsonl, .jsonl.gz or .jsonl.zst)",
                        required=True, flag_values=fv)
    flags.DEFINE_string("output-prefix", None, "output path without suffix", required=True,
                        flag_values=fv)
    flags.DEFINE_multi_string("json-keys", ["text"], "keys to tokenize, one or more words", flag_values=fv)
    flags.DEFINE_enum("tokenizer-type", None, TOKENIZER_TYPES, "the tokenizer's class",
                      required=True, flag_values=fv)
    flags.DEFINE_string("tokenizer-model", None, "SentencePiece .model or HF tokenizer.json",
                        required=True, flag_values=fv)
    flags.DEFINE_string("eod-token", None, "HFTokenizer: end-of-document token (default: guess)",
                        flag_values=fv)
    flags.DEFINE_bool("append-eod", False, "append the end-of-document id to every document",
                      flag_values=fv)
    flags.DEFINE_integer("workers", 1, "tokenizer processes", flag_values=fv)
    flags.DEFINE_bool("skip-malformed", False, "report malformed lines and skip them (default: "
                      "stop at the first one)", flag_values=fv)
    flags.DEFINE_integer("log-interval", 10000, "documents between progress updates",
                         flag_values=fv)
    return cli.parse(fv, argv, __doc__, multiword=("json-keys",))


def run(args: types.SimpleNamespace) -> dict:
    """Tokenizes `args.input`; returns the summary (documents, tokens, skipped, seconds, tokens_per_s)."""
    if not os.path.isfile(args.input):
        raise DataError(f"--input {args.input!r} does not exist")
    if args.workers < 1:
        raise DataError(f"--workers {args.workers} must be at least 1")
    tokenizer = load_tokenizer(args.tokenizer_type, args.tokenizer_model, args.eod_token)
    dtype = best_fitting_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"--output-prefix {args.output_prefix!r}: its folder {out_dir} cannot be "
                        f"created ({e.strerror or e}); choose another --output-prefix") from None
    paths = {k: f"{args.output_prefix}_{k}_document" for k in args.json_keys}
    builders = {k: IndexedDatasetBuilder(p + ".bin", dtype) for k, p in paths.items()}
    init = (args.tokenizer_type, args.tokenizer_model, args.eod_token, list(args.json_keys), args.append_eod)
    docs = tokens = skipped = 0
    start = time.perf_counter()
    pool = None
    try:
        if args.workers == 1:
            init_encoder(*init)
            results = map(encode_json_line, _numbered_lines(args.input))
        else:
            pool = multiprocessing.get_context("spawn").Pool(args.workers, initializer=init_encoder, initargs=init)
            results = pool.imap(encode_json_line, _numbered_lines(args.input), chunksize=64)
        with tqdm(results, desc="tokenizing", unit="doc", mininterval=1.0, disable=None) as bar:
            for lineno, encoded, error, _ in bar:
                if error is not None:
                    where = f"{args.input}:{lineno}: {error}"
                    if not args.skip_malformed:
                        raise DataError(f"{where}; fix the line or pass --skip-malformed")
                    tqdm.write(f"skipping malformed line {where}", file=sys.stderr)
                    skipped += 1
                    continue
                for key, ids in encoded.items():
                    builders[key].add_document(ids, [len(ids)] if ids else [])
                    tokens += len(ids)
                docs += 1
        for k, b in builders.items():
            b.finalize(paths[k] + ".idx")
    except BaseException:
        for k, b in builders.items():
            try:
                b._file.close()
            except OSError:  # the buffered tail cannot be written either (disk full)
                pass
            for ext in (".bin", ".idx"):
                if os.path.exists(paths[k] + ext):
                    os.remove(paths[k] + ext)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - start
    summary = {"documents": docs, "tokens": tokens, "skipped": skipped, "seconds": seconds,
               "tokens_per_s": tokens / max(seconds, 1e-9), "dtype": str(dtype), "outputs": list(paths.values())}
    print(f"documents {docs}  tokens {tokens}  skipped {skipped}  {seconds:.1f} s  "
          f"{summary['tokens_per_s']:.0f} tokens/s  dtype {dtype}")
    for p in paths.values():
        print(f"wrote {p}.bin / {p}.idx")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: writing {args.output_prefix}_*_document.bin/.idx failed ({e}); the partial "
              "files were removed. Check free disk space, then run the same command again",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
