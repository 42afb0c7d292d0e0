"""Tokenizers: train a small sentencepiece BPE model on a corpus, or load the real Qwen one.

`train_tokenizer` trains a sentencepiece **BPE** model with **byte fallback** (no character is ever
unknown: anything unseen becomes UTF-8 byte pieces) and Qwen's control tokens `<|endoftext|>`,
`<|im_start|>`, `<|im_end|>` as user-defined symbols, so encoding the literal string yields the
single id. `<|endoftext|>` is the end-of-document token (`eos_id`). The options suit source code:
whitespace and newlines are kept verbatim (identity normalisation, no extra-whitespace removal, no
dummy prefix), digits are split, and training samples a bounded number of multi-line chunks so it
takes seconds even on the whole Python standard library.

`load_tokenizer` accepts a sentencepiece `.model` file, or a directory holding either a Hugging
Face `tokenizer.json` (the real Qwen2.5 tokenizer; needs the `tokenizers` package) or one `*.model`.

Nothing here imports JAX. Within `qwenjax.data` this module imports only the corpus reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from qwenjax.data.corpus import iter_documents, resolve_files
from qwenjax.errors import UserError

EOS_PIECE = "<|endoftext|>"
CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

#: <unk> + control tokens + 256 bytes + 64 learned pieces.
MIN_VOCAB_SIZE = 1 + len(CONTROL_TOKENS) + 256 + 64

#: The fixed sentencepiece options (see the module doc): BPE with byte fallback, the control tokens as
#: user-defined symbols, no bos/eos/pad pieces, text kept verbatim, digits split, input sampled.
_TRAINER_OPTIONS = {
    "model_type": "bpe", "byte_fallback": True, "user_defined_symbols": list(CONTROL_TOKENS),
    "unk_id": 0, "bos_id": -1, "eos_id": -1, "pad_id": -1,
    "normalization_rule_name": "identity", "remove_extra_whitespaces": False, "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True, "split_digits": True, "shuffle_input_sentence": True,
    "minloglevel": 2,
}

#: Training sentences are chunks of at most this many lines of a document (newlines kept).
_CHUNK_LINES = 8


class Tokenizer:
    """Common interface of both backends.

    encode(text) -> list[int]; encode_batch(texts) -> list[list[int]]; decode(ids) -> str;
    id_to_piece(id) -> str; eos_id; vocab_size; path (what was loaded); fingerprint (content hash).
    """

    eos_id: int
    vocab_size: int
    path: Path
    fingerprint: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, the character index in `text` where each token starts): chat loss masks need the spans."""
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id})")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: Path):
        self.path = Path(model_file)
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read tokenizer {self.path}: {e.strerror or e}") from None
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except Exception:
            raise UserError(f"{self.path} is not a valid sentencepiece model "
                            "(corrupt or wrong file)") from None
        if sp.get_piece_size() == 0:
            raise UserError(f"{self.path} is not a valid sentencepiece model (empty vocabulary)")
        self._sp = sp
        self.fingerprint = hashlib.sha256(data).hexdigest()
        self.vocab_size = int(sp.get_piece_size())
        eos = sp.piece_to_id(EOS_PIECE)
        if eos == sp.unk_id() or sp.id_to_piece(eos) != EOS_PIECE:
            eos = sp.eos_id()  # a foreign sentencepiece model: use its own </s>
        if eos < 0:
            raise UserError(f"{self.path} has neither {EOS_PIECE} nor an eos piece; retrain it with "
                            "`qwenjax tokenizer train`")
        self.eos_id = int(eos)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=_num_threads())

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        pieces = self._sp.encode(text, return_type="proto").pieces  # begin: a UTF-8 byte offset
        char_of_byte = [i for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))]
        char_of_byte.append(len(text))
        return [p.id for p in pieces], [char_of_byte[p.begin] for p in pieces]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (for example the real Qwen2.5 tokenizer)."""

    def __init__(self, directory: Path):
        try:
            from tokenizers import Tokenizer as _HF  # local: optional in practice, a clear error if absent
        except ImportError:
            raise UserError(f"{directory} holds a Hugging Face tokenizer.json; reading it needs the "
                            "`tokenizers` package (pip install tokenizers)") from None
        self.path = Path(directory)
        tj = self.path / "tokenizer.json"
        try:
            data = tj.read_bytes()
            tok = _HF.from_str(data.decode("utf-8"))
        except OSError as e:
            raise UserError(f"cannot read {tj}: {e.strerror or e}") from None
        except Exception:
            raise UserError(f"{tj} is not a valid Hugging Face tokenizer.json "
                            "(corrupt or wrong file)") from None
        self._tok = tok
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        eos = _eos_from_configs(self.path)
        if eos is None:
            eos = tok.token_to_id(EOS_PIECE)
        if eos is None:
            raise UserError(f"{tj} has no {EOS_PIECE} token and no eos_token_id in generation_config.json "
                            "or config.json")
        self.eos_id = int(eos)
        h = hashlib.sha256(data)
        h.update(str(self.eos_id).encode())
        self.fingerprint = h.hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [start for start, _ in enc.offsets]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        p = self._tok.id_to_token(int(i))
        if p is None:
            raise IndexError(f"token id {i} out of range for vocabulary of {self.vocab_size}")
        return p


def _eos_from_configs(directory: Path) -> int | None:
    for name in ("generation_config.json", "config.json"):
        f = directory / name
        if not f.is_file():
            continue
        try:
            eos = json.loads(f.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(eos, list) and eos:  # e.g. Qwen instruct: [151645, 151643]; first is the stop token
            eos = eos[0]
        if isinstance(eos, int):
            return eos
    return None


def _num_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def resolve_tokenizer_file(path: str | os.PathLike) -> Path:
    """The file whose content defines the tokenizer (`tokenizer.json` or the `.model`)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return p / "tokenizer.json"
        models = sorted(p.glob("*.model"))
        if len(models) == 1:
            return models[0]
        if not models:
            raise UserError(f"tokenizer folder {p} has neither tokenizer.json nor a *.model file")
        raise UserError(f"tokenizer folder {p} has {len(models)} *.model files; pass one of them")
    if p.is_file():
        return p
    raise UserError(f"tokenizer {p} does not exist (train one with `qwenjax tokenizer train`)")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a sentencepiece `.model` file, or a folder with `tokenizer.json` or one `*.model`."""
    f = resolve_tokenizer_file(path)
    if f.name == "tokenizer.json":
        return HFTokenizer(f.parent)
    return SentencePieceTokenizer(f)


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of what defines the tokenizer at `path` (cheap: no model is built)."""
    f = resolve_tokenizer_file(path)
    h = hashlib.sha256(f.read_bytes())
    if f.name == "tokenizer.json":
        eos = _eos_from_configs(f.parent)
        if eos is None:
            return HFTokenizer(f.parent).fingerprint
        h.update(str(eos).encode())
    return h.hexdigest()


def _training_sentences(files: Sequence[Path], max_sentence_length: int) -> Iterator[str]:
    """Multi-line chunks of each document (newlines kept so code layout is learned)."""
    for _key, text in iter_documents(files):
        lines = text.split("\n")
        for i in range(0, len(lines), _CHUNK_LINES):
            chunk = "\n".join(lines[i:i + _CHUNK_LINES])
            if i + _CHUNK_LINES < len(lines):
                chunk += "\n"
            if not chunk.strip():
                continue
            b = chunk.encode("utf-8", "replace")
            if len(b) > max_sentence_length:  # one overlong line (minified data): keep its head
                chunk = b[:max_sentence_length].decode("utf-8", "ignore")
            yield chunk


def train_tokenizer(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    max_sentence_length: int = 16384,
    input_sentence_size: int = 200_000,
    character_coverage: float = 0.9995,
    seed: int = 0,
) -> Path:
    """Train a sentencepiece BPE + byte-fallback tokenizer; returns the path of `<model_prefix>.model`.

    `files` is a path/glob/folder (see `qwenjax.data.resolve_files`) or a list of files. At most
    `input_sentence_size` training chunks (of up to 8 lines, at most `max_sentence_length` bytes) are
    sampled, so training time is bounded. `<prefix>.model` and `<prefix>.vocab` appear atomically.
    """
    if isinstance(files, (str, os.PathLike)):
        file_list = resolve_files(files)
    else:
        file_list = [Path(f) for f in files]
        if not file_list:
            raise UserError("no training files given for the tokenizer")
    vocab_size = int(vocab_size)
    reserved = 1 + len(CONTROL_TOKENS) + 256
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"tokenizer vocab size {vocab_size} is too small: {reserved} ids are reserved for <unk>, "
                        f"the control tokens and the 256 byte-fallback pieces; use at least {MIN_VOCAB_SIZE}")
    if max_sentence_length < 64 or input_sentence_size < 1:
        raise UserError("max_sentence_length must be >= 64 and input_sentence_size >= 1")
    prefix = Path(model_prefix).expanduser()
    if prefix.suffix == ".model":
        prefix = prefix.with_suffix("")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = prefix.parent / f".{prefix.name}.tmp-{os.getpid()}-{random.getrandbits(32):08x}"

    sentences = _training_sentences(file_list, max_sentence_length)
    first = next(sentences, None)
    if first is None:
        raise UserError(f"the tokenizer corpus ({len(file_list)} files) holds no text")

    def _all():
        yield first
        yield from sentences

    spm.set_random_generator_seed(int(seed))  # the input-sentence sampling
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_all(), model_prefix=str(tmp_prefix), vocab_size=vocab_size,
            max_sentence_length=max_sentence_length, input_sentence_size=input_sentence_size,
            character_coverage=character_coverage, num_threads=_num_threads(), **_TRAINER_OPTIONS,
        )
        for ext in (".vocab", ".model"):  # .model last: its presence means the pair is complete
            os.replace(f"{tmp_prefix}{ext}", f"{prefix}{ext}")
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        too_high = re.search(r"Vocabulary size too high.*?<= *(\d+)", msg)
        if too_high:
            raise UserError(f"tokenizer vocab size {vocab_size} is too large for this corpus; use at most "
                            f"{too_high.group(1)} or more data") from None
        msg = re.sub(r"^[A-Z_]+: \S+\(\d+\) \[.*?\] ", "", msg)  # drop sentencepiece's source location
        raise UserError(f"sentencepiece training failed: {msg}") from None
    finally:
        for ext in (".model", ".vocab"):
            try:
                os.unlink(f"{tmp_prefix}{ext}")
            except FileNotFoundError:
                pass
    return Path(f"{prefix}.model")
