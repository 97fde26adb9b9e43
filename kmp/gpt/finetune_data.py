"""Fine-tuning data for any keras-hub CausalLM, tokenized with the model's own tokenizer.

Two kinds of file, told apart by their suffix:

- plain text (any other suffix): each file is one document, `[start] + tokens + [end]` as the
  model's preprocessor frames it, the documents concatenated and cut into windows of
  `seq_len + 1` tokens; every next token is trained on (language modelling).
- `.jsonl`: one JSON object a line with string fields `prompt` and `response`; each line is
  one window `[start] + prompt + response + [end]`, padded to `seq_len + 1`, and only the
  response's tokens (and the end token) carry loss weight: the prompt is context, never a
  target.

The last tenth of the text stream (of the examples, for `.jsonl`) is validation data.
Batches are drawn by `(seed, batch index)` alone, so a resumed run reads the batches an
uninterrupted one would.
"""

from __future__ import annotations

import glob
import json
import sys
import warnings
from pathlib import Path

import keras
import numpy as np

from kmp.errors import UserError

VAL_SHARE = 0.1


def data_files(spec: str) -> list[Path]:
    """Lists the files a data spec names: a file, a directory (every file under it) or a glob.

    Args:
        spec: str. A file, a directory or a glob (`**` recurses).

    Returns:
        A sorted list of Path.

    Raises:
        UserError: when the spec names no file.

    Example:
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> for name in ("b.txt", "a.txt"):
    ...     _ = Path(folder, name).write_text("text")
    >>> [p.name for p in data_files(os.path.join(folder, "*.txt"))]
    ['a.txt', 'b.txt']
    """
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True)
                       if Path(p).is_file())
    if not files:
        raise UserError(f"--data {spec!r} names no file. Pass a text file, a directory or a "
                        "glob of text or .jsonl files (prompt/response lines).", field="data")
    return files


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--data file {path} cannot be read as UTF-8 text ({type(e).__name__}: "
                        f"{str(e)[:80]}). Pass readable UTF-8 text or .jsonl files.",
                        field="data") from None


def _ids(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return [int(i) for i in keras.ops.convert_to_numpy(tokenizer.tokenize(text)).reshape(-1)]


def _special(tokenizer, name: str):
    value = getattr(tokenizer, f"{name}_token_id", None)
    return None if value is None else int(value)


class TuneData:
    """Tokenized fine-tuning data: training and validation windows with loss weights.

    `load_data` makes it.

    Args:
        train: tuple. `(token_ids, targets, weights, padding_mask)`, arrays of shape
            `(windows, seq_len)`: int32, int32, float32, bool.
        val: tuple. The validation windows, the same way.
        kind: str. "text" or "jsonl".
        files: list of Path. The files read.
        tokens: int. Tokens read (before windowing).

    Example:
    >>> import numpy as np
    >>> rows = (np.zeros((4, 3), "int32"), np.ones((4, 3), "int32"),
    ...         np.ones((4, 3), "float32"), np.ones((4, 3), bool))
    >>> data = TuneData(rows, rows, "text", [], 16)
    >>> inputs, targets, weights = data.batches(batch_size=2, seed=0, start=0, stop=5)[0]
    >>> inputs["token_ids"].shape, len(data.val_batches(3))
    ((2, 3), 2)
    """

    def __init__(self, train, val, kind, files, tokens):
        self.train, self.val, self.kind, self.files, self.tokens = train, val, kind, files, tokens

    def batches(self, batch_size: int, seed: int, start: int, stop: int):
        """The training batches `start..stop-1`, each drawn by `(seed, batch index)` alone.

        Args:
            batch_size: int. Windows per batch.
            seed: int. The draw's seed.
            start: int. The first batch's index (a resumed run's position).
            stop: int. One past the last batch's index.

        Returns:
            A `Batches` (a `keras.utils.PyDataset`) of `(inputs, targets, weights)`.
        """
        return Batches(self.train, batch_size, seed, start, stop)

    def val_batches(self, batch_size: int):
        """The validation windows in order, in batches.

        Args:
            batch_size: int. Windows per batch (the last batch may hold fewer).

        Returns:
            A list of `(inputs, targets, weights)`; inputs is a dict of `token_ids` and
            `padding_mask`.
        """
        n = len(self.val[0])
        return [_batch(self.val, np.arange(i, min(i + batch_size, n)))
                for i in range(0, n, batch_size)]


def _batch(arrays, rows):
    ids, targets, weights, mask = (a[rows] for a in arrays)
    return {"token_ids": ids, "padding_mask": mask}, targets, weights


class Batches(keras.utils.PyDataset):
    """Training batches `start..stop-1`, each drawn by `(seed, batch index)` alone.

    A `keras.utils.PyDataset`: batch i holds the windows `(seed, i)` draws (with replacement
    only when there are fewer windows than a batch), so a resumed run reads the batches an
    uninterrupted one would.

    Args:
        arrays: tuple. `(token_ids, targets, weights, padding_mask)` (`TuneData.train`).
        batch_size: int. Windows per batch.
        seed: int. The draw's seed.
        start: int. The first batch's index.
        stop: int. One past the last batch's index.
        **kwargs: passed to `keras.utils.PyDataset`.

    Example:
    >>> import numpy as np
    >>> rows = tuple(np.arange(12).reshape(4, 3) for _ in range(4))
    >>> batches = Batches(rows, batch_size=2, seed=0, start=10, stop=12)
    >>> len(batches), batches[1][0]["token_ids"].shape
    (2, (2, 3))
    """

    def __init__(self, arrays, batch_size, seed, start, stop, **kwargs):
        super().__init__(**kwargs)
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.start, self.stop = start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        n = len(self.arrays[0])
        rng = np.random.default_rng([self.seed, self.start + i])
        return _batch(self.arrays, rng.choice(n, size=self.batch_size,
                                              replace=n < self.batch_size))


def _windows(stream: np.ndarray, seq_len: int):
    count = max(0, (len(stream) - 1) // seq_len)
    starts = np.arange(count) * seq_len
    full = np.stack([stream[s:s + seq_len + 1] for s in starts]) if count else np.zeros(
        (0, seq_len + 1), np.int32)
    ones = np.ones((count, seq_len), np.float32)
    return (full[:, :-1].astype("int32"), full[:, 1:].astype("int32"), ones,
            ones.astype(bool))


def _text(files, tokenizer, seq_len, add_start, add_end, progress):
    start, end = _special(tokenizer, "start"), _special(tokenizer, "end")
    stream = []
    for i, path in enumerate(files):
        ids = _ids(tokenizer, _read(path))
        stream += ([start] if add_start and start is not None else []) + ids + (
            [end] if add_end and end is not None else [])
        progress.update(i + 1)
    stream = np.asarray(stream, np.int64)
    cut = len(stream) - max(seq_len + 1, int(len(stream) * VAL_SHARE))
    train, val = _windows(stream[:cut], seq_len), _windows(stream[cut:], seq_len)
    if len(train[0]) == 0 or len(val[0]) == 0:
        raise UserError(f"--data holds {len(stream)} tokens, too few for training and "
                        f"validation windows of {seq_len} tokens. Pass more text, or a "
                        "smaller --seq-len.", field="data")
    return train, val, len(stream)


def _example(obj, path, line_no):
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str)
                                            for k in ("prompt", "response")):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{path}:{line_no} is not a prompt/response example (got {got}). "
                        'Write one {"prompt": "...", "response": "..."} object a line.',
                        field="data")
    return obj["prompt"], obj["response"]


def _jsonl(files, tokenizer, seq_len, add_start, add_end, progress):
    start, end = _special(tokenizer, "start"), _special(tokenizer, "end")
    pad = _special(tokenizer, "pad") or 0
    rows, tokens, empty, cut, longest = [], 0, 0, 0, 0
    for i, path in enumerate(files):
        for line_no, line in enumerate(_read(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            prompt, response = _example(obj, path, line_no)
            head = ([start] if add_start and start is not None else []) + _ids(tokenizer,
                                                                                 prompt)
            tail = _ids(tokenizer, response) + ([end] if add_end and end is not None else [])
            seq = (head + tail)[:seq_len + 1]
            tokens += len(head) + len(tail)
            longest = max(longest, len(head))
            weights = np.zeros(seq_len, np.float32)
            weights[max(len(head) - 1, 0):len(seq) - 1] = 1.0  # targets that are the response
            if not weights.any():  # the prompt fills the window: nothing to train on
                empty += 1
                continue
            cut += len(head) + len(tail) > seq_len + 1
            ids = np.full(seq_len + 1, pad, np.int64)
            ids[:len(seq)] = seq
            mask = np.zeros(seq_len, bool)
            mask[:len(seq) - 1] = True
            rows.append((ids[:-1], ids[1:], weights, mask))
        progress.update(i + 1)
    if empty:
        what = (f"{empty} of {empty + len(rows)} prompt/response examples have no response "
                f"token within the {seq_len}-token window (a prompt of more than {seq_len} "
                f"tokens fills it; the longest prompt has {longest})")
        if not rows:
            raise UserError(f"--data: all {what}, so there is nothing to train on. Use a "
                            f"larger --seq-len (up to the model's maximum) or shorter "
                            "prompts.", field="data")
        warnings.warn(f"kmp: {what}: they are left out. Use a larger --seq-len or shorter "
                      "prompts to train on them.", stacklevel=3)
    if len(rows) < 2:
        raise UserError(f"--data holds {len(rows)} prompt/response example(s) with a response "
                        "token in the window; fine-tuning needs at least 2 (training and "
                        "validation).", field="data")
    n_val = max(1, int(len(rows) * VAL_SHARE))
    stack = lambda part: tuple(np.stack(c).astype(d) for c, d in zip(  # noqa: E731
        zip(*part), ("int32", "int32", "float32", "bool")))
    return stack(rows[:-n_val]), stack(rows[-n_val:]), tokens, cut


def load_data(spec: str, preprocessor, seq_len: int, log=print) -> TuneData:
    """Reads and tokenizes fine-tuning data with a keras-hub CausalLM's preprocessor.

    Args:
        spec: str. A file, directory or glob: plain text files, or `.jsonl` files of
            prompt/response lines (not mixed).
        preprocessor: the model's `CausalLMPreprocessor` (its tokenizer, and whether it adds
            start and end tokens).
        seq_len: int. Window length in tokens.
        log: callable. Where the summary line goes. Defaults to print.

    Returns:
        A `TuneData`.

    Raises:
        UserError: for a spec naming no readable file, text and .jsonl mixed, a .jsonl line
            without string `prompt` and `response`, .jsonl examples whose prompts all fill
            the window (no response token to train on), or too little data.

    Warns:
        UserWarning: when some (not all) .jsonl prompts fill the window: those examples
            are left out, and the warning says how many.

    Example:
    >>> import json, os, tempfile
    >>> import keras_hub
    >>> vocabulary = {"<|endoftext|>": 0, "a": 1, "b": 2, "Ġ": 3, "Ġa": 4, "Ġb": 5}
    >>> tokenizer = keras_hub.tokenizers.GPT2Tokenizer(vocabulary, ["Ġ a", "Ġ b"])
    >>> preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer)
    >>> path = os.path.join(tempfile.mkdtemp(), "pairs.jsonl")
    >>> line = json.dumps({"prompt": "a b", "response": " a a"}) + "\\n"
    >>> _ = Path(path).write_text(line * 4)
    >>> data = load_data(path, preprocessor, seq_len=6)
    data: 1 jsonl file(s), 24 tokens: 3 training and 1 validation windows of 6
    >>> data.train[2][0].tolist()  # <|endoftext|> a b -> " a a" <|endoftext|>: 3 targets
    [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    """
    files = data_files(spec)
    kinds = {p.suffix == ".jsonl" for p in files}
    if len(kinds) > 1:
        raise UserError(f"--data {spec!r} mixes .jsonl and plain text files. Pass one kind.",
                        field="data")
    kind = "jsonl" if kinds == {True} else "text"
    tokenizer = preprocessor.tokenizer
    add_start = getattr(preprocessor, "add_start_token", True)
    add_end = getattr(preprocessor, "add_end_token", True)
    progress = keras.utils.Progbar(len(files), unit_name="file",
                                    verbose=1 if sys.stdout.isatty() else 0)
    if kind == "jsonl":
        train, val, tokens, cut = _jsonl(files, tokenizer, seq_len, add_start, add_end,
                                         progress)
    else:
        (train, val, tokens), cut = _text(files, tokenizer, seq_len, add_start, add_end,
                                          progress), 0
    log(f"data: {len(files)} {kind} file(s), {tokens:,} tokens: {len(train[0])} training and "
        f"{len(val[0])} validation windows of {seq_len}"
        + (f" ({cut} responses cut short at the window's end)" if cut else ""))
    return TuneData(train, val, kind, files, tokens)
