"""Corpus -> byte-level BPE tokenizer -> uint16 token cache -> batches of windows.

A GPT-2-style byte-level BPE is trained on the corpus with the `tokenizers` library, and the
tokenized text is stored as two uint16 memmaps (train and validation) under a cache directory
keyed by the corpus files and the vocabulary size, so later runs reuse both. The corpus is
streamed in pieces: building a cache takes memory that does not grow with the corpus.
Training batches are random windows whose positions depend only on (seed, batch index): a
resumed run sees exactly the batches an uninterrupted one would. Batches are served by a
`keras.utils.PyDataset`, which every Keras backend's `fit` reads (no tf.data needed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import sys
import sysconfig
from pathlib import Path

import keras
import numpy as np

from kmp.checkpoint import write_json_atomic
from kmp.errors import UserError

EOT = "<|endoftext|>"
# keras-hub pads prompts with id 0 and stops generating at the end token, so id 0 must not be
# <|endoftext|> (a prompt's padding would count as an end): it is a padding token never trained on.
PAD = "<|pad|>"
VAL_EVERY_BLOCK = 20  # every 20th block of the token stream is validation data (5%)
BLOCK_TOKENS = 8192
CHUNK_CHARS = 1 << 20  # characters tokenized at a time: bounds the memory of a build
MIN_VOCAB_SIZE = 258  # a byte-level BPE always holds 256 bytes, <|pad|> and <|endoftext|>
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


def text_files(files: list[Path]) -> tuple[list[Path], int, int]:
    """The files that are UTF-8 text, read in blocks (never a whole file at once).

    Args:
        files: list of Path. Candidate corpus files (e.g. from `corpus_files`).

    Returns:
        (files with text, number of files skipped as not UTF-8 text, characters in the files
        with text). Files of only whitespace are neither kept nor counted as skipped.
    """
    kept, skipped, characters = [], 0, 0
    for path in files:
        chars, blank = 0, True
        try:
            with open(path, encoding="utf-8") as f:
                while (block := f.read(CHUNK_CHARS)) and "\x00" not in block:  # NUL: binary
                    chars, blank = chars + len(block), blank and not block.strip()
        except (UnicodeDecodeError, OSError):
            block = "\x00"
        skipped += bool(block)  # stopped before the end: not text
        if not block and not blank:
            kept.append(path)
            characters += chars
    return kept, skipped, characters


def _cuttable(line: str, next_line: str) -> bool:
    # Between a line ending "x\n" and one starting with "y" (x, y not whitespace), the
    # pre-tokenizers of `tokenizers`' ByteLevel and keras-hub's GPT2Tokenizer (both its
    # paths) always split, so text cut there tokenizes exactly as it does whole.
    return (len(line) > 1 and line[-1] == "\n" and not line[-2].isspace() and line[-2] != "६"
            and not next_line[0].isspace() and next_line[0] != "६")


def document_pieces(files: list[Path], chunk_chars: int | None = None):
    """Yields (text, last) for the files in order: each file's text in pieces of about
    `chunk_chars` characters, cut only where tokenization splits anyway.

    A file is read line by line and cut only between a line that ends in a non-space
    character and one that starts with one, so its tokens are those of the whole text, and
    memory holds one piece, not the corpus. A file without such a place is one piece.

    Args:
        files: list of Path. UTF-8 text files (see `text_files`).
        chunk_chars: int or None. Characters at which a piece may end. Defaults to None:
            `CHUNK_CHARS`.

    Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp(), "a.py")
    >>> _ = path.write_text("x = 1\\ny = 2\\n")
    >>> list(document_pieces([path], chunk_chars=4))
    [('x = 1\\n', False), ('y = 2\\n', True)]
    """
    chunk_chars = chunk_chars or CHUNK_CHARS
    for path in files:
        with open(path, encoding="utf-8") as f:
            piece, size = [], 0
            for line in f:
                if size >= chunk_chars and _cuttable(piece[-1], line):
                    yield "".join(piece), False
                    piece, size = [], 0
                piece.append(line)
                size += len(line)
            yield "".join(piece), True


def train_tokenizer(pieces, vocab_size: int, directory: Path) -> Path:
    """Trains a GPT-2-style byte-level BPE on an iterable of texts; writes vocab.json and
    merges.txt. It has at most `max(vocab_size, MIN_VOCAB_SIZE)` tokens (all 256 bytes are
    always in it): id 0 is `<|pad|>`, id 1 `<|endoftext|>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(pieces, trainer)
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

    @property
    def vocab_size(self) -> int:
        """The tokenizer's real vocabulary size: every token id is below it."""
        return self.meta["vocab_size"]

    def tokenizer(self):
        return load_tokenizer(self.directory)


def check_vocab(cache: TokenCache, vocab_size: int):
    """Raises a UserError unless every token id of `cache` fits an embedding of `vocab_size`.

    Args:
        cache: TokenCache. The token cache.
        vocab_size: int. The model's vocabulary (embedding) size.

    Raises:
        UserError: when the cache's tokenizer has more tokens than `vocab_size`.

    Example:
    >>> check_vocab(TokenCache(Path("."), {"vocab_size": 258}), 320)
    """
    if cache.vocab_size > vocab_size:
        raise UserError(f"The tokenizer in {cache.directory} has {cache.vocab_size} tokens, more "
                        f"than vocab_size {vocab_size}: its ids would fall outside the embedding. "
                        f"Use a vocab_size of at least {cache.vocab_size}.", field="vocab_size")


def _fingerprint(files, vocab_size) -> str:
    h = hashlib.sha256(f"v2 {vocab_size}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _atomic_file(path: Path):
    """A binary file written under a temporary name, fsynced and renamed: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _encode(tok, files, chunk_chars, out, progress=None):
    """Tokenizes `files` into the open binary file `out` (uint16 ids, an end token after each
    file), a batch of pieces of about `chunk_chars` characters at a time."""
    eot, done, batch, size = np.array([tok.token_to_id(EOT)], np.uint16), 0, [], 0
    for piece, last in itertools.chain(document_pieces(files, chunk_chars), [("", True)]):
        if piece:
            batch.append((piece, last))
            size += len(piece)
        if batch and (size >= chunk_chars or not piece):  # a full batch, or the end
            rows = tok([text for text, _ in batch])
            out.write(np.concatenate([a for row, (_, end) in zip(rows, batch) for a in
                                      [np.asarray(row, np.uint16)] + [eot] * end]).tobytes())
            done, batch, size = done + sum(end for _, end in batch), [], 0
            if progress:
                progress.update(done)


def _split(tokens_path: Path, directory: Path, corpus: str) -> tuple[int, int]:
    """Splits the token stream at `tokens_path` into train.bin and val.bin, every
    VAL_EVERY_BLOCK-th block to val, a period of blocks at a time; returns their lengths."""
    n = tokens_path.stat().st_size // 2
    block = min(BLOCK_TOKENS, n // VAL_EVERY_BLOCK)
    if block < 2:
        raise UserError(f"Corpus {corpus!r} has only {n} tokens: too small to split into train "
                        "and validation. Use a larger corpus.", field="corpus")
    with open(tokens_path, "rb") as tokens, _atomic_file(directory / "train.bin") as train, \
            _atomic_file(directory / "val.bin") as val:  # read, not mapped: RSS stays flat
        cut = 2 * block * (VAL_EVERY_BLOCK - 1)  # bytes of a period's train blocks
        while part := tokens.read(2 * block * VAL_EVERY_BLOCK):
            train.write(part[:cut])
            val.write(part[cut:])
        val_tokens = val.tell() // 2
    return n - val_tokens, val_tokens


def build_token_cache(corpus: str, vocab_size: int, cache_dir, log=print,
                      chunk_chars: int | None = None) -> TokenCache:
    """Returns the token cache for `corpus`, building it (tokenizer included) if needed.

    The tokenizer trains on, and the cache is written from, pieces of about `chunk_chars`
    characters (`document_pieces`): memory does not grow with the corpus. Files are written
    under temporary names and renamed, meta.json last: a killed build is redone, never reused.
    On a terminal a progress bar is drawn; elsewhere (a log file, a pipe) a line per stage.

    Args:
        corpus: str. A corpus spec for `corpus_files`.
        vocab_size: int. BPE vocabulary size to train (at most this many tokens), the model's
            embedding size; at least `MIN_VOCAB_SIZE` (258).
        cache_dir: str or Path. Parent directory of the caches.
        log: callable. Where progress lines go. Defaults to print.
        chunk_chars: int or None. Characters tokenized at a time. Defaults to None:
            `CHUNK_CHARS` (1 Mi).

    Raises:
        UserError: when vocab_size is below `MIN_VOCAB_SIZE`, when the corpus names no file,
            when no file decodes as UTF-8 text, when the corpus is too small to split, or when
            a cached tokenizer has more tokens than `vocab_size` (see `check_vocab`).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab_size {vocab_size} is below the minimum of {MIN_VOCAB_SIZE} for "
                        "a byte-level BPE (256 bytes, <|pad|> and <|endoftext|>). Use a "
                        f"vocab_size of at least {MIN_VOCAB_SIZE}.", field="vocab_size")
    chunk_chars = chunk_chars or CHUNK_CHARS
    files = corpus_files(corpus)
    directory = Path(cache_dir).expanduser() / f"tokens-{_fingerprint(files, vocab_size)}"
    meta_path = directory / "meta.json"
    if meta_path.exists():
        cache = TokenCache(directory, json.loads(meta_path.read_text()))
        check_vocab(cache, vocab_size)
        log(f"token cache: reusing {directory} ({cache.meta['train_tokens']:,} train / "
            f"{cache.meta['val_tokens']:,} val tokens)")
        return cache
    texts, skipped, characters = text_files(files)
    log(f"corpus: {corpus!r}: {len(files)} files, {len(texts)} read, {skipped} skipped "
        f"(not UTF-8 text), {characters / 1e6:.1f} M characters")
    if not texts:
        raise UserError(f"Corpus {corpus!r} has no UTF-8 text ({len(files)} files, {skipped} "
                        "skipped). Use text files.", field="corpus")
    log(f"tokenizer: training a byte-level BPE with {vocab_size} tokens ...")
    train_tokenizer((text for text, _ in document_pieces(texts, chunk_chars)), vocab_size,
                    directory)
    # Encode with keras-hub's tokenizer, the one sampling uses: it groups whitespace a little
    # differently from `tokenizers`' ByteLevel pre-tokenizer (e.g. "\n\n" is one piece).
    tok = load_tokenizer(directory)
    log(f"tokenizer: encoding {len(texts)} files ...")
    tty = getattr(sys.stdout, "isatty", lambda: False)()  # where Progbar writes
    progress = keras.utils.Progbar(len(texts), unit_name="file") if tty else None
    tokens_path = directory / ".tokens.tmp"
    try:
        with open(tokens_path, "wb") as out:
            _encode(tok, texts, chunk_chars, out, progress)
        train_tokens, val_tokens = _split(tokens_path, directory, corpus)
    finally:
        tokens_path.unlink(missing_ok=True)
    meta = {"corpus": corpus, "files": len(files), "documents": len(texts), "skipped": skipped,
            "characters": characters, "vocab_size": tok.vocabulary_size(),
            "train_tokens": train_tokens, "val_tokens": val_tokens}
    cache = TokenCache(directory, meta)
    check_vocab(cache, vocab_size)
    write_json_atomic(meta_path, meta)  # written last: marks the cache complete
    log(f"token cache: {directory} ({train_tokens:,} train / {val_tokens:,} val tokens, "
        f"{characters / (train_tokens + val_tokens):.2f} characters per token)")
    return cache


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
        position: callable or None. Batch index -> the data position it reads (the seed
            of its windows): a run that leaves some positions out (a recovery's skipped
            windows, `kmp.recovery.RecoveryPlan.position`) passes its mapping. Defaults to
            None: batch b reads position b.
        rows: slice or None. This process's rows of every batch, in a run across processes
            (`kmp.distributed.shard`); the batches and their order are the global ones.
            Defaults to None: all rows.
    """

    def __init__(self, tokens, seq_len, batch_size, seed, start, stop, position=None,
                 rows=None):
        super().__init__()
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.start, self.stop, self.position = start, stop, position
        self.rows = rows or slice(None)

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        index = self.start + i
        index = index if self.position is None else self.position(index)
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
                  stop: int, position=None, rows=None) -> Batches:
    """Training batches `start` .. `stop - 1` (random windows) of the cache's train split,
    each reading the data `position` gives it; `rows` of each (see `Batches`)."""
    tokens = cache.train
    _check_fits(tokens, seq_len, "train")
    return Batches(tokens, seq_len, batch_size, seed, start, stop, position, rows)


def val_dataset(cache: TokenCache, seq_len: int, batch_size: int, max_batches: int,
                rows=None) -> Windows:
    """Consecutive, non-overlapping validation windows (at most `max_batches` batches).

    With `rows` (a process's share of each batch in a run across processes) only whole
    batches are kept, and this process's rows of each.

    Raises:
        UserError: when the split is shorter than one window, or, with `rows`, than one
            batch of windows.
    """
    tokens = np.asarray(cache.val)
    _check_fits(tokens, seq_len, "validation")
    windows = (len(tokens) - 1) // seq_len
    count = min(windows, batch_size * max_batches)
    if rows is not None and rows != slice(0, batch_size):
        count -= count % batch_size
        if not count:
            raise UserError(
                f"The validation split has {len(tokens)} tokens: {windows} windows of seq_len "
                f"{seq_len}, fewer than one batch of {batch_size}, the least a run across "
                "processes evaluates. Use a larger corpus, or a smaller batch_size or seq_len.",
                field="batch_size")
    windows = np.stack([tokens[i * seq_len:(i + 1) * seq_len + 1] for i in range(count)])
    windows = windows.astype(np.int32)
    if rows is not None and rows != slice(0, batch_size):
        keep = np.arange(count).reshape(-1, batch_size)[:, rows].ravel()
        windows = windows[keep]
        batch_size = rows.stop - rows.start
    return Windows(windows[:, :-1], windows[:, 1:], batch_size)
