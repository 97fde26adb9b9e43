"""Corpus, tokenizer, token cache and windows of the GPT recipe."""

import numpy as np
import pytest

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
    docs, skipped = data.read_documents(data.corpus_files(str(tmp_path)))
    assert len(docs) == 1 and skipped == 1


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
