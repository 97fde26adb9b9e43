"""`kmp finetune --preset` (kmp.gpt.finetune_hub, kmp.gpt.lora, kmp.gpt.finetune_data) on
tiny, randomly initialised GPT-2, Llama and Gemma presets built here with their own tokenizers
(GPT-2: a byte-level BPE trained with `tokenizers`; Llama and Gemma: SentencePiece BPE models
trained with `sentencepiece` from the test corpus), and `kmp pretrain`'s plain keras-hub preset.
No network: every preset is a local directory."""

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from _tiny_presets import CORPUS, build

import kmp
from kmp.cli import main

FAST = dict(jit_compile=False, samples=0, batch_size=8, eval_every=4, log=lambda *a: None)


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    return {arch: build(arch, root / arch) for arch in ("gpt2", "llama", "gemma")}


@pytest.fixture(scope="module")
def gemma(presets):
    """The tiny Gemma preset, loaded once (float32) for the tests that only read it."""
    from kmp.gpt.lora import load_causal_lm

    return load_causal_lm(presets["gemma"], dtype="float32")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A third of the test corpus: about 60 training and 8 validation windows."""
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(CORPUS.read_text()[:18000])
    return str(path)


def _values(model):
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}


def _frozen_and_trained(exact, model, trains=("lora_kernel",)):
    """Compares a trained model with `load_finetuned`'s rebuild of it (the source preset as
    loaded, quantized as the run did, with the saved adapters): every variable is equal, bit
    for bit, so the frozen ones are the preset's and the trained ones were saved whole. Returns
    the variable paths that train (those named by `trains`)."""
    ours, rebuilt = _values(model), _values(exact)
    assert ours.keys() == rebuilt.keys()
    assert not [p for p in ours if not np.array_equal(ours[p], rebuilt[p])]
    trained = {v.path for v in model.trainable_variables}
    assert trained == {p for p in ours if any(t in p for t in trains)}, trained
    # lora_kernel_b starts at zeros (Keras): after training, none is left zero.
    assert all(ours[p].any() for p in trained if p.endswith("lora_kernel_b"))
    return trained


@pytest.fixture(scope="module")
def lora_run(presets, text, tmp_path_factory):
    """A finished 4-step LoRA run on the tiny GPT-2 under mixed_bfloat16, validated and
    checkpointed every 2 steps, shared read-only: (its --out directory, metrics, model)."""
    from kmp.gpt.finetune_hub import finetune_preset

    out = tmp_path_factory.mktemp("lora") / "run"
    r, model = finetune_preset(presets["gpt2"], text, out, return_model=True, **LORA)
    return out, r, model


LORA = dict(lora=4, steps=4, learning_rate=1e-2, precision="mixed_bfloat16",
            **{**FAST, "eval_every": 2})


@pytest.mark.backends
def test_lora_trains_only_the_adapters_and_both_forms_reload_to_the_measured_loss(
        lora_run, presets, text, tmp_path):
    from kmp.gpt.adapters import load_finetuned
    from kmp.gpt.finetune_data import load_data
    from kmp.gpt.finetune_hub import finetune_preset
    from kmp.gpt.finetune_metrics import evaluate

    out, r, model = lora_run
    # Only the adapters train (keras-hub would also train the targets' biases; kmp does not).
    names = sorted(v.path.rsplit("/", 1)[-1] for v in model.trainable_variables)
    assert set(names) == {"lora_kernel_a", "lora_kernel_b"} and len(names) == 8  # 2 x q, v
    assert r["trainable_params"] == sum(int(np.prod(v.shape))
                                        for v in model.trainable_variables)
    # Mixed precision: float32 adapter masters, bfloat16 compute in the LoRA layers.
    for layer in model.backbone._flatten_layers():
        if getattr(layer, "lora_enabled", False):
            assert layer.lora_kernel_a.dtype == "float32" and layer.compute_dtype == "bfloat16"
    # The loss falls, and both saved forms reload to what was measured; the exact form (the
    # preset as loaded + the adapters) equals the trained model bit for bit: everything but
    # the adapters is the preset's.
    assert r["val_loss_after"] < r["val_loss_before"] - 1e-3, r
    assert r["merged_exact"] and abs(r["val_loss_merged"] / r["val_loss_after"] - 1) < 1e-4
    val = load_data(text, model.preprocessor, r["seq_len"], log=lambda *a: None)
    exact = kmp.harden(load_finetuned(out, dtype=r["policy"]))
    assert len(_frozen_and_trained(exact, model)) == 8
    assert abs(evaluate(exact, val.val_batches(8)) / r["val_loss_after"] - 1) < 1e-6
    for name in ("metrics.json", "adapters.lora.h5", "loss.png", "samples.txt",
                 "history.json", "preset/config.json", "preset/tokenizer.json"):
        assert (out / name).is_file(), name
    assert not (out / "adapters.trained.h5").exists()  # nothing trained in full
    assert any((out / "tensorboard").rglob("events.out.tfevents*"))
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("val_loss_before", "val_loss_after", "trainable_params", "total_params",
                "tokens_per_sec", "host_peak_rss_bytes", "compiled_step_bytes"):
        assert key in saved, key
    if keras.backend.backend() == "jax":
        assert saved["compiled_step_bytes"]["total"] > 0

    # --resume from the checkpoint after step 2 (as if the run had been killed there) ends
    # where the uninterrupted run ended (the restored model's loss is the step-2 loss exactly;
    # the last two steps measured 1.2e-5 relative apart, not yet traced: not bit for bit).
    copy = shutil.copytree(out, tmp_path / "run")
    _rewind_to_step_2(copy)
    resumed = finetune_preset(presets["gpt2"], text, copy, resume=True, **LORA)
    assert abs(resumed["val_loss_after"] / r["val_loss_after"] - 1) < 1e-4, (resumed, r)


@pytest.mark.backends
def test_load_finetuned_finds_the_source_from_any_directory(lora_run, presets, tmp_path,
                                                            monkeypatch):
    from kmp.gpt.adapters import load_finetuned

    out, r, model = lora_run
    # A new run records its source preset's absolute path.
    assert json.loads((out / "metrics.json").read_text())["source_preset"] == str(
        Path(presets["gpt2"]).resolve())
    # A run recorded before that holds the path relative to where it was started (here, a
    # directory above both the run and the preset): found from another working directory.
    root = Path(presets["gpt2"]).resolve().parents[1]
    moved = shutil.copytree(out, tmp_path / "old" / "run",
                            ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    record = json.loads((moved / "metrics.json").read_text())
    record["source_preset"] = str(Path(presets["gpt2"]).resolve().relative_to(root))
    (moved / "metrics.json").write_text(json.dumps(record))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert tmp_path.resolve().is_relative_to(root)
    _frozen_and_trained(load_finetuned(moved), model)
    # A source that moved away: one line saying so, and `source=` to say where it is now.
    record["source_preset"] = str(tmp_path / "gone" / "gpt2")
    (moved / "metrics.json").write_text(json.dumps(record))
    with pytest.raises(kmp.UserError, match="gone/gpt2 that .* is not found.*source=DIR"):
        load_finetuned(moved)
    assert load_finetuned(moved, source=presets["gpt2"]).backbone.count_params() > 0
    # A relative source named like the run's own merged preset is never taken for it.
    record["source_preset"] = "preset"
    (moved / "metrics.json").write_text(json.dumps(record))
    with pytest.raises(kmp.UserError, match="source preset preset that .* is not found"):
        load_finetuned(moved)
    # Not a finished run: one line each, no traceback of ours.
    (moved / "metrics.json").unlink()
    with pytest.raises(kmp.UserError, match="has no metrics.json, so it is not a finished"):
        load_finetuned(moved)
    (moved / "metrics.json").write_text(json.dumps(record))
    (moved / "adapters.lora.h5").unlink()
    with pytest.raises(kmp.UserError, match="adapters.lora.h5 is missing"):
        load_finetuned(moved)


def test_lora_with_train_embeddings_trains_the_embedding_and_saves_it_everywhere(
        presets, text, tmp_path):
    from kmp.gpt.adapters import load_finetuned
    from kmp.gpt.finetune_data import load_data
    from kmp.gpt.finetune_hub import finetune_preset
    from kmp.gpt.finetune_metrics import evaluate
    from kmp.gpt.lora import load_causal_lm

    out, kw = tmp_path / "emb", dict(lora=4, train_embeddings=True, steps=4,
                                     learning_rate=1e-2, precision="float32",
                                     **{**FAST, "eval_every": 2})
    r, model = finetune_preset(presets["gpt2"], text, out, return_model=True, **kw)
    # The adapters and the (tied) token embedding train; nothing else changes, bit for bit:
    # the exact form (the preset + adapters + adapters.trained.h5) is the trained model.
    embedding = model.backbone.token_embedding.embeddings.path
    assert r["train_embeddings"] and r["trainable_params"] == sum(
        int(np.prod(v.shape)) for v in model.trainable_variables)
    exact = kmp.harden(load_finetuned(out))
    trained = _frozen_and_trained(exact, model, trains=("lora_kernel", embedding))
    assert embedding in trained and len(trained) == 9, trained  # 8 adapters + the embedding
    # Against the preset as plain keras-hub loads it, too: only the embedding moved.
    source, ours = _values(load_causal_lm(presets["gpt2"])), _values(model)
    assert [p for p in source if not np.array_equal(source[p], ours[p])] == [embedding]
    # The merged preset, and source + adapters + adapters.trained.h5, reload to the measured
    # loss; without the trained file the exact form would be another model.
    assert r["merged_exact"] and abs(r["val_loss_merged"] / r["val_loss_after"] - 1) < 1e-4
    val = load_data(text, model.preprocessor, r["seq_len"], log=lambda *a: None)
    assert abs(evaluate(exact, val.val_batches(8)) / r["val_loss_after"] - 1) < 1e-6
    # --resume from the step-2 checkpoint keeps the checkpoint's embedding (the frozen base
    # alone comes back from the preset) and ends where the uninterrupted run ended: 1.2e-4
    # relative apart measured (this preset has dropout 0.1, whose masks a resumed run does
    # not replay); with the embedding put back to the preset's, 2.9e-2.
    _rewind_to_step_2(out)
    resumed = finetune_preset(presets["gpt2"], text, out, resume=True, **kw)
    assert abs(resumed["val_loss_after"] / r["val_loss_after"] - 1) < 2e-3, (resumed, r)


def _pairs(path: Path) -> str:
    """Prompt/response lines: consecutive lines of the test corpus."""
    lines = [s for s in CORPUS.read_text().splitlines() if s.strip()][:240]
    path.write_text("".join(json.dumps({"prompt": a, "response": b}) + "\n"
                            for a, b in zip(lines[::2], lines[1::2])))
    return str(path)


@pytest.mark.parametrize("arch,base", [
    pytest.param("llama", "int8", marks=pytest.mark.slow),  # ~20 s alone; int4 is the default
    ("gemma", "int4"),
])
def test_lora_on_a_quantized_base(arch, base, presets, text, tmp_path):
    from kmp.gpt.adapters import load_finetuned
    from kmp.gpt.finetune_data import load_data
    from kmp.gpt.finetune_hub import finetune_preset
    from kmp.gpt.finetune_metrics import evaluate
    from kmp.gpt.lora import load_causal_lm

    targets = ["query", "value", "feedforward_output_dense" if arch == "llama" else "ffw_linear"]
    r, model = finetune_preset(presets[arch], text, tmp_path / "out", lora=4,
                               lora_targets=targets, base=base, steps=4, learning_rate=1e-2,
                               precision="mixed_bfloat16", return_model=True, **FAST)
    assert r["lora_targets"] == sorted(targets)
    assert r["val_loss_after"] < r["val_loss_base"] - 5e-4, r
    # The quantized base is smaller than the float model (an int8 base keeps the token
    # embedding, half of these tiny models, in float: kmp.gpt.lora._not_reversible), and
    # frozen bit for bit: the exact form (the preset quantized again, + the adapters) is the
    # trained model, and reloads to the measured loss. The merged preset re-quantizes (its
    # loss is reported beside the measured one).
    float_bytes = sum(int(np.prod(v.shape)) * 4
                      for v in load_causal_lm(presets[arch], dtype="float32").weights)
    assert r["weight_bytes"] < (0.75 if base == "int8" else 0.6) * float_bytes
    exact = load_finetuned(tmp_path / "out")
    assert len(_frozen_and_trained(exact, model)) == 2 * 2 * len(targets)  # a, b; 2 layers
    assert "val_loss_merged" in r and isinstance(r["merged_exact"], bool)
    val = load_data(text, model.preprocessor, r["seq_len"], log=lambda *a: None)
    assert abs(evaluate(exact, val.val_batches(8)) / r["val_loss_after"] - 1) < 1e-6


def test_full_fine_tuning_on_prompt_response_data(presets, tmp_path):
    from kmp.gpt.finetune_hub import finetune_preset

    # A third of these examples have prompts longer than the window: left out, and said so.
    with pytest.warns(UserWarning, match=r"\d+ of 120 prompt/response examples have no "):
        r = finetune_preset(presets["llama"], _pairs(tmp_path / "pairs.jsonl"),
                            tmp_path / "full", steps=4, learning_rate=3e-3, precision="float32",
                            **{**FAST, "samples": 1})
    assert r["data_kind"] == "jsonl" and r["lora"] is None
    assert r["trainable_params"] == r["total_params"]
    assert r["val_loss_after"] < r["val_loss_before"] - 1e-2, r
    assert abs(r["val_loss_merged"] / r["val_loss_after"] - 1) < 1e-5
    assert not (tmp_path / "full" / "adapters.lora.h5").exists()
    assert (tmp_path / "full" / "samples.txt").read_text().strip()


@pytest.mark.backends
def test_jsonl_trains_on_the_response_only(gemma, tmp_path):
    from kmp.gpt.finetune_data import load_data

    model = gemma
    tok = model.preprocessor.tokenizer
    path = tmp_path / "one.jsonl"
    path.write_text('{"prompt": "def f(x):", "response": " return x"}\n' * 3)
    data = load_data(str(path), model.preprocessor, 16, log=lambda *a: None)
    ids, targets, weights, mask = (a[0] for a in data.train)
    prompt = len(keras.ops.convert_to_numpy(tok.tokenize("def f(x):")))
    response = len(keras.ops.convert_to_numpy(tok.tokenize(" return x")))
    assert ids[0] == tok.start_token_id
    # Targets 0..prompt-1 are the prompt's (after <bos>): no weight; then the response and
    # <eos> carry weight; padding carries none.
    assert weights.tolist() == [0.0] * prompt + [1.0] * (response + 1) + [0.0] * (
        16 - prompt - response - 1)
    assert targets[prompt + response] == tok.end_token_id and mask.sum() == prompt + response + 1


@pytest.mark.backends
def test_jsonl_prompts_that_fill_the_window_are_counted_and_left_out(gemma, tmp_path):
    from kmp.gpt.finetune_data import load_data

    long, short = "def f(x): " * 12, {"prompt": "def f(x):", "response": " return x"}
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in [
        {"prompt": long, "response": " return x"}, short, short, short, short,
        {"prompt": long, "response": " pass"}]))
    with pytest.warns(UserWarning, match=r"2 of 6 prompt/response examples have no response "
                      r"token within the 16-token window"):
        data = load_data(str(path), gemma.preprocessor, 16, log=lambda *a: None)
    assert len(data.train[0]) + len(data.val[0]) == 4
    assert (data.train[2].sum(axis=1) > 0).all() and (data.val[2].sum(axis=1) > 0).all()
    # Every prompt filling the window: one line saying what to do.
    path.write_text(json.dumps({"prompt": long, "response": " return x"}) + "\n")
    with pytest.raises(kmp.UserError, match="all 1 of 1 prompt/response examples .* nothing "
                       "to train on. Use a larger --seq-len"):
        load_data(str(path), gemma.preprocessor, 16, log=lambda *a: None)
    # A response cut short at the window's end still trains on what fits, and is counted.
    lines = []
    path.write_text((json.dumps({"prompt": "def f(x):", "response": long}) + "\n") * 2)
    data = load_data(str(path), gemma.preprocessor, 16, log=lines.append)
    assert "(2 responses cut short at the window's end)" in lines[-1]
    assert data.train[2].sum() > 0


@pytest.mark.backends
@pytest.mark.filterwarnings("ignore:.*quantiz.*:UserWarning")
def test_lora_refuses_gptq_awq_and_float8_bases(presets):
    from kmp.gpt import lora

    for policy in ("gptq/4/-1_from_float32", "awq/4/-1_from_float32"):
        layer = keras.layers.Dense(4, dtype=policy)
        model = keras.Sequential([keras.Input((8,)), layer])
        with pytest.raises(kmp.UserError, match=f"LoRA on a {policy[:4].rstrip('/')} base"):
            lora.enable_lora(model, 4)
    model = lora.load_causal_lm(presets["gpt2"])
    model.backbone.quantize("float8")
    with pytest.raises(kmp.UserError, match="LoRA on a float8 base is not supported"):
        lora.enable_lora(model, 4)


def test_user_errors_are_one_line(presets, tmp_path, capsys):
    gpt2 = str(presets["gpt2"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00" * 50)
    cases = [
        (["--preset", "no_such_preset_xyz", "--data", str(CORPUS)],
         "neither a directory nor a keras-hub preset name. Presets need a download"),
        (["--preset", str(tmp_path), "--data", str(CORPUS)], "without config.json"),
        (["--preset", gpt2, "--data", str(tmp_path / "none*.txt")], "names no file"),
        (["--preset", gpt2, "--data", str(binary)], "cannot be read as UTF-8"),
        (["--preset", gpt2, "--data", str(bad)], "bad.jsonl:2 is not a prompt/response"),
        (["--preset", gpt2, "--data", str(CORPUS), "--seq-len", "65"],
         "above this model's maximum sequence length 64"),
        (["--preset", gpt2, "--data", str(CORPUS), "--base", "int4"], "without LoRA"),
        # Checked before the data is read (here it could not be).
        (["--preset", gpt2, "--data", str(binary), "--lora", "2", "--lora-targets", "nope"],
         "--lora-targets nope name no Dense"),
        (["--preset", gpt2, "--data", str(CORPUS), "--lora", "0"],
         "--lora must be a positive integer rank. Received: 0"),
        (["--preset", gpt2, "--data", str(CORPUS), "--train-embeddings"],
         "--train-embeddings goes with --lora"),
        (["--preset", gpt2, "--data", str(CORPUS), "--lora", "2", "--base", "int4",
          "--train-embeddings"], "the token embedding is quantized and cannot train"),
    ]
    for argv, message in cases:
        assert main(["finetune", *argv, "--steps", "2", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)


def test_pretrain_writes_a_preset_that_plain_keras_hub_loads(micro_run):
    import keras_hub

    from kmp.gpt.hub_preset import check_preset

    config = json.loads((micro_run / "preset" / "config.json").read_text())
    assert config["module"].startswith("keras_hub.") and config["class_name"] == "GPT2Backbone"
    ours, plain = check_preset(micro_run)
    assert abs(plain / ours - 1) < 1e-5, (ours, plain)
    model = keras_hub.models.CausalLM.from_preset(str(micro_run / "preset"))
    text = model.generate("def", max_length=8)
    assert isinstance(text, str) and text.startswith("def")


def _rewind_to_step_2(out):
    """Points the run's latest.json at its step-2 checkpoint, as if it had been killed there."""
    import hashlib

    ckpt = out / "checkpoints"
    record = json.loads((ckpt / "latest.json").read_text())
    early = ckpt / "batch-00000002.weights.h5"
    record.update(weights=early.name, bytes=early.stat().st_size, batches=2, position=2,
                  sha256=hashlib.sha256(early.read_bytes()).hexdigest())
    record["extra"]["history"]["train"] = record["extra"]["history"]["train"][:2]
    record["extra"]["history"]["val"] = record["extra"]["history"]["val"][:1]
    (ckpt / "latest.json").write_text(json.dumps(record))
