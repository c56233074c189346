"""Tokenize jsonl (optionally .gz / .zst) into Megatron `.bin/.idx` files.

The counterpart of Megatron-DeepSpeed's `tools/preprocess_data.py`: one document per json line, the
text of every `--json-keys` key tokenized (Llama2Tokenizer prepends BOS), `--append-eod` appends the
end-of-document id, and the output is `{output_prefix}_{key}_document.bin/.idx`. Unlike the fork, the
appended EOD is counted in the index sizes (spec/megatron-deepspeed.md §8).

    python scripts/preprocess_data.py --input docs.jsonl.zst --output-prefix out/papers \\
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --append-eod --workers 8
"""

from __future__ import annotations

import argparse
import gzip
import io
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator

from tqdm import tqdm

from agpt_jax.data.indexed import DataError, IndexedDatasetBuilder, best_fitting_dtype
from agpt_jax.data.tokenizer import TOKENIZER_TYPES, encode_json_line, init_encoder, load_tokenizer

def open_text(path: str) -> io.TextIOBase:
    """Opens a text file, decompressing `.gz` and `.zst` by suffix."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), encoding="utf-8")
    return open(path, encoding="utf-8")


def _numbered_lines(path: str) -> Iterator[tuple[int, str]]:
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="jsonl file (.jsonl, .jsonl.gz or .jsonl.zst)")
    p.add_argument("--output-prefix", required=True, help="output path without suffix")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize (default: text)")
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model or HF tokenizer.json")
    p.add_argument("--eod-token", default=None, help="HFTokenizer: end-of-document token (default: guess)")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document id to every document")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--skip-malformed", action="store_true",
                   help="report malformed lines and skip them (default: stop at the first one)")
    p.add_argument("--log-interval", type=int, default=10000, help="documents between progress updates")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Tokenizes `args.input`; returns the summary (documents, tokens, skipped, seconds, tokens_per_s)."""
    if not os.path.isfile(args.input):
        raise DataError(f"--input {args.input!r} does not exist")
    if args.workers < 1:
        raise DataError(f"--workers {args.workers} must be at least 1")
    tokenizer = load_tokenizer(args.tokenizer_type, args.tokenizer_model, args.eod_token)
    dtype = best_fitting_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
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
    except BaseException:
        for k, b in builders.items():
            b._file.close()
            for ext in (".bin", ".idx"):
                if os.path.exists(paths[k] + ext):
                    os.remove(paths[k] + ext)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    for k, b in builders.items():
        b.finalize(paths[k] + ".idx")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
