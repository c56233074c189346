"""Tokenizers as Megatron's preprocessing uses them: SentencePiece (Llama2Tokenizer) and HF tokenizer.json.

`Llama2Tokenizer` follows `megatron/tokenizer/tokenizer.py:_Llama2Tokenizer`: `tokenize` prepends BOS,
`eod` is the SentencePiece `eos_id`. `HFTokenizer` loads a `tokenizer.json` with the `tokenizers`
library and encodes with its post-processor (special tokens as the file defines them).
"""

from __future__ import annotations

import dataclasses
import json
import os

from agpt_jax.data.indexed import DataError

__all__ = ["TOKENIZER_TYPES", "Tokenizer", "encode_json_line", "init_encoder", "load_tokenizer"]

TOKENIZER_TYPES = ("Llama2Tokenizer", "HFTokenizer")
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


@dataclasses.dataclass
class Tokenizer:
    """A loaded tokenizer.

    Attributes:
        kind: one of `TOKENIZER_TYPES`.
        path: the model file.
        vocab_size: number of ids (decides the `.bin` dtype).
        eod: end-of-document id appended by `--append-eod`.
        bos: beginning-of-sequence id, or None.
    """

    kind: str
    path: str
    vocab_size: int
    eod: int
    bos: int | None
    _impl: object = dataclasses.field(repr=False)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as Megatron's tokenizer of this kind returns them."""
        if self.kind == "Llama2Tokenizer":
            return [self.bos] + self._impl.encode(text)
        return self._impl.encode(text).ids

    def detokenize(self, ids) -> str:
        """Text of a list of ids."""
        ids = [int(i) for i in ids]
        if self.kind == "Llama2Tokenizer":
            return self._impl.decode_ids(ids)
        return self._impl.decode(ids, skip_special_tokens=False)


def load_tokenizer(kind: str, path: str, eod_token: str | None = None) -> Tokenizer:
    """Loads a tokenizer.

    Args:
        kind: "Llama2Tokenizer" (a SentencePiece `.model`) or "HFTokenizer" (a `tokenizer.json`, or a
            folder holding one).
        path: the model file.
        eod_token: HFTokenizer only: the token whose id is the end of document; default: the first
            of </s>, <|endoftext|>, <eos>, <|end_of_text|>, <|eot_id|> the vocabulary has.

    Raises:
        DataError: unknown kind, missing file, or no end-of-document token found.
    """
    if kind not in TOKENIZER_TYPES:
        raise DataError(f"--tokenizer-type {kind!r}: expected one of {', '.join(TOKENIZER_TYPES)}")
    if kind == "HFTokenizer" and os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(f"--tokenizer-model {path!r} does not exist")
    if kind == "Llama2Tokenizer":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"--tokenizer-model {path}: not a SentencePiece model ({e})") from None
        if sp.bos_id() < 0 or sp.eos_id() < 0:
            raise DataError(f"{path}: the SentencePiece model defines no BOS/EOS id, Llama2Tokenizer needs both")
        return Tokenizer(kind, path, sp.vocab_size(), sp.eos_id(), sp.bos_id(), sp)
    import tokenizers

    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception on a malformed file
        raise DataError(f"--tokenizer-model {path}: not a tokenizers tokenizer.json ({e})") from None
    names = [eod_token] if eod_token else list(_EOS_CANDIDATES)
    eod = next((tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None), None)
    if eod is None:
        raise DataError(
            f"{path}: none of {names} is in the vocabulary; pass --eod-token with the end-of-document token"
        )
    bos = next((tok.token_to_id(n) for n in ("<s>", "<|begin_of_text|>", "<bos>") if tok.token_to_id(n) is not None), None)
    return Tokenizer(kind, path, tok.get_vocab_size(with_added_tokens=True), eod, bos, tok)


# Per-process state of the preprocessing workers (spawned processes load the tokenizer once).
_TOKENIZER: Tokenizer | None = None
_OPTIONS: dict = {}


def init_encoder(kind: str, model: str, eod_token: str | None, json_keys: list[str], append_eod: bool) -> None:
    """Loads the tokenizer of this (worker) process for `encode_json_line`."""
    global _TOKENIZER, _OPTIONS
    _TOKENIZER = load_tokenizer(kind, model, eod_token)
    _OPTIONS = {"json_keys": json_keys, "append_eod": append_eod}


def encode_json_line(item: tuple[int, str]) -> tuple[int, dict[str, list[int]] | None, str | None, int]:
    """Tokenizes one json line.

    Returns:
        (line number, {key: token ids} or None, error message or None, bytes of the line).
    """
    lineno, line = item
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        return lineno, None, f"invalid JSON ({e.msg} at column {e.colno})", len(line)
    if not isinstance(data, dict):
        return lineno, None, f"expected a JSON object, got {type(data).__name__}", len(line)
    out = {}
    for key in _OPTIONS["json_keys"]:
        if key not in data:
            return lineno, None, f"missing key {key!r} (have {sorted(data)[:8]})", len(line)
        text = data[key]
        sentences = text if isinstance(text, list) else [text]
        if not all(isinstance(s, str) for s in sentences):
            return lineno, None, f"key {key!r} is not a string or a list of strings", len(line)
        ids: list[int] = []
        for s in sentences:
            ids.extend(_TOKENIZER.tokenize(s))
        if ids and _OPTIONS["append_eod"]:
            ids.append(_TOKENIZER.eod)
        out[key] = ids
    return lineno, out, None, len(line)
