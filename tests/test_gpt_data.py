"""Corpus, tokenizer, token cache and windows of the GPT recipe."""

import io
import json
import sys
import tracemalloc

import numpy as np
import pytest

from kmp.errors import UserError
from kmp.gpt import data

pytestmark = pytest.mark.backends

CORPUS = "tests/data/corpus.txt"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return data.build_token_cache(CORPUS, 512, tmp_path_factory.mktemp("cache"), log=print)


def test_stdlib_corpus_is_python_source_without_tests():
    files = data.corpus_files("stdlib")
    assert len(files) > 300 and all(f.suffix == ".py" for f in files)
    assert not any({"test", "tests", "site-packages"} & set(f.parts) for f in files)


def test_missing_and_empty_corpus_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="names no file"):
        data.corpus_files(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="names no file"):
        data.corpus_files(str(tmp_path))  # an empty directory
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(ValueError, match="no UTF-8 text"):
        data.build_token_cache(str(tmp_path), 512, tmp_path / "cache", log=print)
    (tmp_path / "tiny.txt").write_text("x = 1\n")
    with pytest.raises(ValueError, match="too small"):
        data.build_token_cache(str(tmp_path), 512, tmp_path / "cache2", log=print)


def test_undecodable_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "a.py").write_text("def f(x):\n    return x + 1\n" * 400)
    (tmp_path / "b.dat").write_bytes(b"\xff\xfe\x00\x81" * 100)
    (tmp_path / "c.txt").write_text("\n  \n")  # only whitespace: not a document, not skipped
    files, skipped, characters = data.text_files(data.corpus_files(str(tmp_path)))
    assert [f.name for f in files] == ["a.py"] and skipped == 1 and characters == 27 * 400


def test_token_cache_is_built_once_and_reused(cache, tmp_path_factory, capsys):
    meta = cache.meta
    assert meta["vocab_size"] <= 512 and meta["train_tokens"] > 10 * meta["val_tokens"] > 0
    assert cache.train.dtype == np.uint16 and int(np.max(cache.train)) < meta["vocab_size"]
    again = data.build_token_cache(CORPUS, 512, cache.directory.parent, log=print)
    assert "reusing" in capsys.readouterr().out and again.directory == cache.directory
    assert np.array_equal(again.train, cache.train)


def test_keras_hub_tokenizer_round_trips_and_matches_the_cache(cache):
    tok = cache.tokenizer()
    text = open(CORPUS, encoding="utf-8").read()
    ids = np.asarray(tok(text))
    assert str(tok.detokenize(ids)) == text
    # The cache holds exactly the keras-hub tokenization (plus an end-of-text token per file),
    # split into 8192-token blocks of which every 20th is validation.
    stream = np.concatenate([ids, [tok.token_to_id(data.EOT)]])
    n = len(stream)
    block = min(data.BLOCK_TOKENS, n // data.VAL_EVERY_BLOCK)
    is_val = (np.arange(n) // block) % data.VAL_EVERY_BLOCK == data.VAL_EVERY_BLOCK - 1
    assert np.array_equal(cache.train, stream[~is_val])
    assert np.array_equal(cache.val, stream[is_val])


def test_windows_depend_only_on_seed_and_index(cache):
    x1, y1 = data.window_batch(cache.train, 32, 4, seed=0, index=7)
    x2, y2 = data.window_batch(cache.train, 32, 4, seed=0, index=7)
    x3, _ = data.window_batch(cache.train, 32, 4, seed=0, index=8)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and not np.array_equal(x1, x3)
    assert x1.shape == (4, 32) and np.array_equal(x1[:, 1:], y1[:, :-1])


def test_datasets_have_the_lm_layout(cache):
    train = data.train_dataset(cache, 32, 4, seed=1, start=5, stop=8)
    batches = [train[i] for i in range(len(train))]
    assert len(batches) == 3
    x, y = batches[0]
    assert x["token_ids"].shape == (4, 32) and x["padding_mask"].all()
    assert np.array_equal(x["token_ids"], data.window_batch(cache.train, 32, 4, 1, 5)[0])
    val = data.val_dataset(cache, 32, 4, max_batches=2)
    assert len(val) == 2 and np.array_equal(val[0][0]["token_ids"][0], cache.val[:32])
    with pytest.raises(ValueError, match="smaller seq_len"):
        data.val_dataset(cache, 10**6, 4, 2)


def test_fit_reads_the_batches_of_every_epoch_in_order(cache):
    """Over several epochs of `steps_per_epoch`, fit reads batches start, start+1, ... once
    each (what makes a resumed run read what an uninterrupted one would)."""
    import keras

    seen = []

    class Recorder(data.Batches):
        def __getitem__(self, i):
            seen.append(self.start + i)
            return super().__getitem__(i)

    inputs = keras.Input((None,), dtype="int32", name="token_ids")
    mask = keras.Input((None,), dtype="int32", name="padding_mask")
    out = keras.layers.Dense(512)(keras.layers.Embedding(512, 4)(inputs))
    model = keras.Model({"token_ids": inputs, "padding_mask": mask}, out)
    model.compile("sgd", "sparse_categorical_crossentropy")
    batches = Recorder(cache.train, 16, 2, seed=0, start=6, stop=12)
    model.fit(batches, epochs=3, initial_epoch=0, steps_per_epoch=2, verbose=0, shuffle=False)
    # Keras's adapters read the first one or two batches ahead to learn their shapes; what
    # follows is what training reads.
    assert seen[-6:] == [6, 7, 8, 9, 10, 11] and len(seen) <= 8


def test_padding_id_is_not_the_end_token(cache):
    # keras-hub pads generation prompts with id 0 and stops at the end token.
    tok = cache.tokenizer()
    assert tok.id_to_token(0) == data.PAD and tok.end_token_id == tok.token_to_id(data.EOT) != 0
    assert 0 not in np.asarray(cache.train)


def test_vocab_size_below_the_byte_level_minimum_is_a_user_error(cache, tmp_path):
    # A byte-level BPE always has 256 byte tokens plus <|pad|> and <|endoftext|>: with
    # vocab_size 256 its ids 256 and 257 would fall outside the embedding.
    with pytest.raises(UserError, match="vocab_size 256 is below the minimum of 258") as e:
        data.build_token_cache(CORPUS, 256, tmp_path, log=print)
    assert e.value.field == "vocab_size" and data.MIN_VOCAB_SIZE == 258
    # The cache reports its tokenizer's real size; every id is below it.
    vocab = (cache.directory / "vocab.json").read_text()
    assert cache.vocab_size == len(json.loads(vocab)) == 512
    assert int(np.max(cache.train)) < cache.vocab_size
    data.check_vocab(cache, 512)
    with pytest.raises(UserError, match="has 512 tokens, more than vocab_size 448"):
        data.check_vocab(cache, 448)


def test_small_validation_split_across_processes_is_a_user_error(cache):
    windows = (len(cache.val) - 1) // 32
    batch = windows + windows % 2 + 2  # more windows per batch than the split has
    with pytest.raises(UserError, match=f"{windows} windows .* fewer than one batch of {batch}"):
        data.val_dataset(cache, 32, batch, 2, rows=slice(0, batch // 2))
    # One process keeps the partial batch; a batch that fits is split as before.
    assert len(data.val_dataset(cache, 32, batch, 2)) == 1
    assert len(data.val_dataset(cache, 32, 4, 2, rows=slice(0, 2))[0][1]) == 2


TRICKY = ("def f(x):\n    return x  \n\n\nclass A:  \n\tpass\n\n\n'll x\n x\n\u096c y\n"
          "z\u096c\nyou're\n'sx\n  \n\u3000z\xa0\nw\r\nv\rq\n123456\n7890\n):\n(\n\u00e9t\u00e9\n"
          "\u65e5\u672c\n\\\n!!\n")


def test_pieces_tokenize_exactly_as_whole_files(cache, tmp_path):
    """Text cut where `document_pieces` cuts gives the tokens (keras-hub, both its paths) and
    the BPE training words (`tokenizers`' ByteLevel) of the whole text."""
    import keras_hub
    from tokenizers import pre_tokenizers

    path = tmp_path / "tricky.txt"
    path.write_text(TRICKY * 3, encoding="utf-8")
    whole = path.read_text(encoding="utf-8")
    pieces = list(data.document_pieces([path], chunk_chars=1))
    assert len(pieces) > 20 and "".join(p for p, _ in pieces) == whole
    assert [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    texts = [p for p, _ in pieces]
    words = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str
    assert [w for t in texts for w, _ in words(t)] == [w for w, _ in words(whole)]
    vocab, merges = str(cache.directory / "vocab.json"), str(cache.directory / "merges.txt")
    for python in (True, False):
        tok = keras_hub.tokenizers.GPT2Tokenizer(vocabulary=vocab, merges=merges,
                                                 _allow_python_workflow=python)
        rows = tok([whole, *texts])
        assert np.array_equal(np.concatenate([np.asarray(r) for r in rows[1:]]), rows[0])


def test_cache_built_in_small_pieces_is_the_same_cache(cache, tmp_path):
    small = data.build_token_cache(CORPUS, 512, tmp_path, log=print, chunk_chars=300)
    assert len(list(data.document_pieces([data.Path(CORPUS)], 300))) > 10
    for name in ("vocab.json", "merges.txt", "train.bin", "val.bin"):
        assert (small.directory / name).read_bytes() == (cache.directory / name).read_bytes()
    assert small.meta == cache.meta


def test_tokenizing_memory_does_not_grow_with_the_corpus(cache, tmp_path, monkeypatch):
    """Python's peak allocation while building the cache of a 1 M-character corpus, 64 Ki
    characters at a time, stays under 4 MiB (about 2.3 MiB, the same for any corpus size);
    holding every file's text and a list of every token id at once took 32 MiB here."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij_"), size=rng.integers(2, 9)))
             for _ in range(300)]
    for k in range(4):
        lines = rng.choice(words, size=(5000, 8))
        (tmp_path / f"f{k}.py").write_text("".join(" ".join(w) + " = 1\n" for w in lines))
    monkeypatch.setattr(data, "CHUNK_CHARS", 1 << 16, raising=False)
    tracemalloc.start()
    try:
        built = data.build_token_cache(str(tmp_path / "*.py"), 512, tmp_path / "c", log=print)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert built.meta["characters"] > 1_000_000 and built.meta["train_tokens"] > 400_000
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_progress_is_one_line_per_stage_off_a_terminal(tmp_path, monkeypatch):
    out = io.StringIO()  # not a TTY, like a log file or a pipe
    monkeypatch.setattr(sys, "stdout", out)
    data.build_token_cache(CORPUS, 320, tmp_path, log=print)
    lines = out.getvalue().splitlines()
    assert not any(c in out.getvalue() for c in "\r\b\x1b"), out.getvalue()
    stages = ["corpus:", "tokenizer: training", "tokenizer: encoding 1 files", "token cache:"]
    assert [line.split(" ...")[0][:len(s)] for line, s in zip(lines, stages)] == stages
    assert len(lines) == 4

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    data.build_token_cache(CORPUS, 384, tmp_path, log=print)
    assert "1/1" in sys.stdout.getvalue()  # keras's progress bar, on a terminal


def test_a_failed_build_leaves_no_cache_and_is_redone(cache, tmp_path, monkeypatch):
    load = data.load_tokenizer

    class Killed:  # a tokenizer stopped mid-encoding, as a kill would stop it
        def __init__(self, directory):
            self.token_to_id = load(directory).token_to_id

        def __call__(self, texts):
            raise KeyboardInterrupt

    monkeypatch.setattr(data, "load_tokenizer", Killed)
    with pytest.raises(KeyboardInterrupt):
        data.build_token_cache(CORPUS, 512, tmp_path, log=print)
    (directory,) = tmp_path.iterdir()
    assert sorted(p.name for p in directory.iterdir()) == ["merges.txt", "vocab.json"]
    monkeypatch.undo()
    again = data.build_token_cache(CORPUS, 512, tmp_path, log=print)
    assert np.array_equal(again.train, cache.train) and again.meta == cache.meta
