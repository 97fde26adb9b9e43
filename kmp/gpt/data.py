"""Corpus -> byte-level BPE tokenizer -> uint16 token cache -> batches of windows.

The corpus is read once, a GPT-2-style byte-level BPE is trained on it with the `tokenizers`
library, and the tokenized text is stored as two uint16 memmaps (train and validation) under a
cache directory keyed by the corpus files and the vocabulary size, so later runs reuse both.
Training batches are random windows whose positions depend only on (seed, batch index): a
resumed run sees exactly the batches an uninterrupted one would. Batches are served by a
`keras.utils.PyDataset`, which every Keras backend's `fit` reads (no tf.data needed).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from pathlib import Path

import keras
import numpy as np

from kmp.checkpoint import write_bytes_atomic, write_json_atomic
from kmp.errors import UserError
from kmp.recovery import position

EOT = "<|endoftext|>"
# keras-hub pads prompts with id 0 and stops generating at the end token, so id 0 must not be
# <|endoftext|> (a prompt's padding would count as an end): it is a padding token never trained on.
PAD = "<|pad|>"
VAL_EVERY_BLOCK = 20  # every 20th block of the token stream is validation data (5%)
BLOCK_TOKENS = 8192
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def corpus_files(spec: str) -> list[Path]:
    """The files a corpus spec names, sorted.

    Args:
        spec: str. "stdlib" (the running Python's standard library `.py` files, without its
            tests), or a file, a directory (all files under it) or a glob pattern.

    Raises:
        UserError: when the spec names no file.
    """
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP)
            files += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
        return files
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise UserError(f"Corpus {spec!r} names no file. Use stdlib, or a file, directory or "
                        "glob of UTF-8 text.", field="corpus")
    return files


def read_documents(files: list[Path]) -> tuple[list[str], int]:
    """Reads each file as UTF-8; returns (non-empty documents, number of files skipped)."""
    docs, skipped = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        if "\x00" in text:  # binary file that happens to decode
            skipped += 1
        elif text.strip():
            docs.append(text)
    return docs, skipped


def train_tokenizer(docs: list[str], vocab_size: int, directory: Path) -> Path:
    """Trains a GPT-2-style byte-level BPE on `docs`; writes vocab.json and merges.txt.

    The vocabulary has at most `vocab_size` entries: id 0 is `<|pad|>`, id 1 `<|endoftext|>`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(docs, trainer, length=len(docs))
    directory.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(directory))
    return directory


def load_tokenizer(directory):
    """The keras-hub GPT2Tokenizer for a vocabulary trained by `train_tokenizer`."""
    import keras_hub

    directory = Path(directory)
    return keras_hub.tokenizers.GPT2Tokenizer(vocabulary=str(directory / "vocab.json"),
                                              merges=str(directory / "merges.txt"))


@dataclasses.dataclass
class TokenCache:
    """A tokenized corpus on disk: train/val uint16 memmaps and the tokenizer beside them.

    Attributes:
        directory: Path. Where vocab.json, merges.txt, train.bin, val.bin and meta.json live.
        meta: dict. Corpus statistics (files, skipped files, tokens, vocabulary size).
    """

    directory: Path
    meta: dict

    @property
    def train(self) -> np.ndarray:
        return np.memmap(self.directory / "train.bin", dtype=np.uint16, mode="r")

    @property
    def val(self) -> np.ndarray:
        return np.memmap(self.directory / "val.bin", dtype=np.uint16, mode="r")

    def tokenizer(self):
        return load_tokenizer(self.directory)


def _fingerprint(files, vocab_size) -> str:
    h = hashlib.sha256(f"v2 {vocab_size}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def build_token_cache(corpus: str, vocab_size: int, cache_dir, log=print) -> TokenCache:
    """Returns the token cache for `corpus`, building it (tokenizer included) if needed.

    Args:
        corpus: str. A corpus spec for `corpus_files`.
        vocab_size: int. BPE vocabulary size to train (at most this many tokens).
        cache_dir: str or Path. Parent directory of the caches.
        log: callable. Where progress lines go. Defaults to print.

    Raises:
        UserError: when the corpus names no file, when no file decodes as UTF-8 text, or
            when the corpus is too small to split.
    """
    files = corpus_files(corpus)
    directory = Path(cache_dir).expanduser() / f"tokens-{_fingerprint(files, vocab_size)}"
    meta_path = directory / "meta.json"
    if meta_path.exists():
        cache = TokenCache(directory, json.loads(meta_path.read_text()))
        log(f"token cache: reusing {directory} ({cache.meta['train_tokens']:,} train / "
            f"{cache.meta['val_tokens']:,} val tokens)")
        return cache
    docs, skipped = read_documents(files)
    log(f"corpus: {corpus!r}: {len(files)} files, {len(docs)} read, {skipped} skipped "
        f"(not UTF-8 text), {sum(map(len, docs)) / 1e6:.1f} M characters")
    if not docs:
        raise UserError(f"Corpus {corpus!r} has no UTF-8 text ({len(files)} files, {skipped} "
                        "skipped). Use text files.", field="corpus")
    log(f"tokenizer: training a byte-level BPE with {vocab_size} tokens ...")
    train_tokenizer(docs, vocab_size, directory)
    # Encode with keras-hub's tokenizer, the one sampling uses: it groups whitespace a little
    # differently from `tokenizers`' ByteLevel pre-tokenizer (e.g. "\n\n" is one piece).
    tok = load_tokenizer(directory)
    eot = tok.token_to_id(EOT)
    ids, progress = [], keras.utils.Progbar(len(docs), unit_name="file")
    for i in range(0, len(docs), 64):
        for row in tok(docs[i:i + 64]):
            ids.extend(np.asarray(row).tolist())
            ids.append(eot)
        progress.update(min(i + 64, len(docs)))
    tokens = np.asarray(ids, dtype=np.uint16)
    block = min(BLOCK_TOKENS, len(tokens) // VAL_EVERY_BLOCK)
    if block < 2:
        raise UserError(f"Corpus {corpus!r} has only {len(tokens)} tokens: too small to split "
                        "into train and validation. Use a larger corpus.", field="corpus")
    blocks = np.arange(len(tokens)) // block
    is_val = blocks % VAL_EVERY_BLOCK == VAL_EVERY_BLOCK - 1
    write_bytes_atomic(directory / "train.bin", tokens[~is_val].tobytes())
    write_bytes_atomic(directory / "val.bin", tokens[is_val].tobytes())
    meta = {"corpus": corpus, "files": len(files), "documents": len(docs), "skipped": skipped,
            "characters": sum(map(len, docs)), "vocab_size": tok.vocabulary_size(),
            "train_tokens": int((~is_val).sum()), "val_tokens": int(is_val.sum())}
    write_json_atomic(meta_path, meta)  # written last: marks the cache complete
    log(f"token cache: {directory} ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val "
        f"tokens, {meta['characters'] / len(tokens):.2f} characters per token)")
    return TokenCache(directory, meta)


def _check_fits(tokens: np.ndarray, seq_len: int, split: str):
    if len(tokens) < seq_len + 1:
        raise UserError(
            f"The {split} split has {len(tokens)} tokens, fewer than one training window "
            f"(seq_len + 1 = {seq_len + 1}). Use a larger corpus or a smaller seq_len.",
            field="seq_len")


def window_batch(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, index: int):
    """Batch `index` of random windows: (inputs, targets), int32 arrays of (batch, seq_len).

    The window positions depend only on (seed, index).
    """
    rng = np.random.default_rng([seed, index])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    windows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def _lm_inputs(x):
    return {"token_ids": x, "padding_mask": np.ones_like(x)}  # int32, as the backbone declares


class Batches(keras.utils.PyDataset):
    """Training batches `start` .. `stop - 1` of random windows (see `window_batch`), as a
    PyDataset: item i is batch `start + i`, ({"token_ids", "padding_mask"}, targets).

    Args:
        tokens: 1-D array of token ids (e.g. `TokenCache.train`).
        seq_len: int. Window length.
        batch_size: int. Windows per batch.
        seed: int. Seed of the window positions.
        start: int. Index of the first batch.
        stop: int. Index after the last batch.
        skip: list of (first, last). Data positions left out of the stream (inclusive
            windows, sorted): batch b reads position `kmp.recovery.position(b, skip)`.
            Defaults to none.
        rows: slice or None. This process's rows of every batch, in a run across processes
            (`kmp.distributed.shard`); the batches and their order are the global ones.
            Defaults to None: all rows.
    """

    def __init__(self, tokens, seq_len, batch_size, seed, start, stop, skip=(), rows=None):
        super().__init__()
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.start, self.stop, self.skip = start, stop, tuple(tuple(w) for w in skip)
        self.rows = rows or slice(None)

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        index = position(self.start + i, self.skip)
        x, y = window_batch(self.tokens, self.seq_len, self.batch_size, self.seed, index)
        return _lm_inputs(x[self.rows]), y[self.rows]


class Windows(keras.utils.PyDataset):
    """Batches of fixed windows (rows of `inputs`/`targets`), in order, as a PyDataset."""

    def __init__(self, inputs, targets, batch_size):
        super().__init__()
        self.inputs, self.targets, self.batch_size = inputs, targets, batch_size

    def __len__(self):
        return -(-len(self.inputs) // self.batch_size)

    def __getitem__(self, i):
        rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return _lm_inputs(self.inputs[rows]), self.targets[rows]


def train_dataset(cache: TokenCache, seq_len: int, batch_size: int, seed: int, start: int,
                  stop: int, skip=(), rows=None) -> Batches:
    """Training batches `start` .. `stop - 1` (random windows) of the cache's train split,
    leaving out the data positions in `skip`; `rows` of each (see `Batches`)."""
    tokens = cache.train
    _check_fits(tokens, seq_len, "train")
    return Batches(tokens, seq_len, batch_size, seed, start, stop, skip, rows)


def val_dataset(cache: TokenCache, seq_len: int, batch_size: int, max_batches: int,
                rows=None) -> Windows:
    """Consecutive, non-overlapping validation windows (at most `max_batches` batches).

    With `rows` (a process's share of each batch in a run across processes) only whole
    batches are kept, and this process's rows of each."""
    tokens = np.asarray(cache.val)
    _check_fits(tokens, seq_len, "validation")
    count = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
    if rows is not None and rows != slice(0, batch_size):
        count -= count % batch_size
    windows = np.stack([tokens[i * seq_len:(i + 1) * seq_len + 1] for i in range(count)])
    windows = windows.astype(np.int32)
    if rows is not None and rows != slice(0, batch_size):
        keep = np.arange(count).reshape(-1, batch_size)[:, rows].ravel()
        windows = windows[keep]
        batch_size = rows.stop - rows.start
    return Windows(windows[:, :-1], windows[:, 1:], batch_size)
