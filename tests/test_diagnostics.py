"""Diagnostics on any Keras model: tracing, gradient histograms, audit, parity."""

import pytest

pytestmark = pytest.mark.backends


def _planted_overflow_model():
    import keras
    import numpy as np

    keras.config.set_dtype_policy("mixed_float16")
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, name="small"),
        keras.layers.Dense(8, name="huge"),  # its weights push activations past 65504
        keras.layers.Dense(1, name="after"),
    ])
    model.get_layer("small").kernel.assign(np.full((4, 8), 1.0, "float32"))
    model.get_layer("huge").kernel.assign(np.full((8, 8), 3e4, "float32"))
    model.compile("sgd", "mse")
    return model


def test_planted_float16_overflow_is_traced_to_its_layer():
    import numpy as np

    from kmp.diagnostics import trace_nonfinite

    model = _planted_overflow_model()
    x = np.random.default_rng(0).uniform(1.0, 2.0, size=(4, 4)).astype("float32")
    trace = trace_nonfinite(model, x, np.zeros((4, 1), "float32"))
    assert trace.forward is not None and trace.forward.name == "sequential/huge"
    assert trace.forward.inf > 0 and trace.forward.dtype == "float16"
    assert "sequential/huge" in str(trace)
    # The model is untouched: calls work and no wrapper is left behind.
    assert "call" not in model.get_layer("huge").__dict__
    assert model(x).shape == (4, 1)


def test_backward_overflow_at_a_large_loss_scale_is_traced():
    import keras
    import numpy as np

    from kmp.diagnostics import trace_nonfinite

    keras.config.set_dtype_policy("mixed_float16")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="a"),
                              keras.layers.Dense(1, name="b")])
    model.compile("sgd", "mse")
    x = np.random.default_rng(1).normal(size=(4, 4)).astype("float32")
    y = np.full((4, 1), 100.0, "float32")
    clean = trace_nonfinite(model, x, y)
    assert clean.forward is None and clean.backward is None and clean.variables == []
    trace = trace_nonfinite(model, x, y, loss_scale=2.0**20)
    assert trace.forward is None  # the forward pass is fine; the scaled gradient is not
    assert trace.backward is not None and trace.backward.name.startswith("sequential/b")
    assert {s.name for s in trace.variables} >= {"sequential/a/kernel"}


def test_tiny_gradients_underflow_and_the_suggested_scale_rescues_them(tmp_path):
    import keras
    import numpy as np
    from keras import ops

    from kmp.diagnostics import gradient_histogram

    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile("sgd", lambda y, p: 1e-7 * ops.mean(ops.square(y - p)))  # tiny gradients
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(64, 16)).astype("float32"), rng.normal(size=(64, 1)).astype("float32")
    report = gradient_histogram(model, x, y)
    before = report.fractions(1.0)
    assert before["flush_to_zero"] > 0.5 and before["overflow"] == 0.0
    scale = report.suggested_scale()
    after = report.fractions(scale)
    assert scale == 2.0**24 and after["flush_to_zero"] < 0.01 and after["overflow"] == 0.0
    # With ordinary gradients the suggestion keeps a factor-2 margin below 65504.
    model.compile("sgd", "mse")
    normal = gradient_histogram(model, x, 1e3 * y)
    top = max(float(m.max()) for m in normal.magnitudes.values())
    s = normal.suggested_scale()
    assert top * s * 2 <= 65504 < top * s * 4
    assert report.fractions(scale, "activation")["flush_to_zero"] < 0.01
    assert "sequential/dense/kernel | variable" in report.table()
    report.plot(tmp_path / "grads.png")
    assert (tmp_path / "grads.png").stat().st_size > 10_000


def _softmax_head_model(dtype):
    import keras

    keras.config.set_dtype_policy(dtype)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
                              keras.layers.Dense(5, activation="softmax", name="probs")])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy())
    return model


def test_audit_flags_a_half_precision_softmax_head_and_the_loss_it_clips():
    import keras
    import numpy as np

    from kmp.diagnostics import audit

    rng = np.random.default_rng(3)
    x = rng.normal(size=(32, 8)).astype("float32")
    fp32 = _softmax_head_model("float32")
    fp32.get_layer("probs").kernel.assign(50 * fp32.get_layer("probs").kernel.numpy())
    y = np.argmin(fp32.predict(x, verbose=0), axis=-1)  # confidently wrong: a large true loss
    half = _softmax_head_model("mixed_float16")
    half.set_weights(fp32.get_weights())
    true_loss = fp32.evaluate(x, y, verbose=0)
    clipped = half.evaluate(x, y, verbose=0)
    assert clipped <= -np.log(1e-7) + 1e-3  # the trap, measured
    if keras.backend.backend() == "tensorflow":  # only TensorFlow's Keras recovers the logits
        assert true_loss > 25  # of a float32 softmax op; JAX and torch clip float32 too

    report = audit(half, x)
    probs = next(r for r in report.layers if r.path == "sequential_1/probs")
    assert (probs.output_dtypes, probs.compute_dtype, probs.variable_dtype) == (
        ("float16",), "float16", "float32")
    assert probs.params == 16 * 5 + 5 and probs.tensor_cores == "no (16 x 5)"
    assert "float16 probabilities to sparse_categorical_crossentropy" in report.warnings[0]
    assert "softmax in half precision in sequential_1/probs" in report.warnings[1]
    assert "sequential_1/probs (16 x 5)" in report.warnings[-1]
    assert "| sequential_1/hidden | Dense |" in str(report)

    # The fix the warning asks for: float32 logits and from_logits=True. No trap left.
    keras.config.set_dtype_policy("mixed_float16")
    fixed = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
                              keras.layers.Dense(8, dtype="float32", name="logits")])
    fixed.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    report = audit(fixed)  # random inputs shaped like the model's
    assert report.warnings == [] and report.model_output_dtypes == ("float32",)
    assert next(r for r in report.layers if r.path.endswith("logits")).island


def test_audit_measures_output_dtypes_the_policy_does_not_declare():
    import kmp
    import kmp.gpt as gpt
    from kmp.diagnostics import audit

    kmp.set_policy("mixed_bfloat16")
    config = gpt.preset("tiny", num_layers=1, hidden_dim=32, num_heads=2, intermediate_dim=64,
                        seq_len=16, vocab_size=1001, logits="float32")
    model = gpt.build_model(config)
    report = audit(model)
    embed = next(r for r in report.layers if r.path == "token_embedding")
    # One layer, two calls: the lookup in bfloat16, the tied vocabulary projection in float32.
    assert embed.compute_dtype == "bfloat16" and embed.output_dtypes == ("bfloat16", "float32")
    assert report.model_output_dtypes == ("float32",)
    assert config.vocab_size == 1024  # padded to a multiple of 64 by the config
    assert embed.params == 1024 * 32 and embed.tensor_cores == "yes"
    assert sum(r.params for r in report.layers) == model.count_params()
    norms = [r for r in report.layers if r.kind == "LayerNormalization"]
    assert len(norms) == 3 and all(r.island for r in norms)
    assert report.warnings == []


def test_parity_check_flags_a_planted_cancellation_and_nothing_else():
    import keras
    import numpy as np

    from kmp.diagnostics import parity_check

    @keras.saving.register_keras_serializable(package="kmp_tests")
    class Cancel(keras.layers.Layer):
        def call(self, x):  # float16 spacing at 2048 is 2: the inputs are rounded away
            return (x + 2048.0) - 2048.0

    def build(cancel):
        keras.config.set_dtype_policy("mixed_float16")
        layers = [keras.Input((8,)), keras.layers.Dense(16, name="before")]
        layers += [Cancel(name="cancel")] if cancel else []
        model = keras.Sequential(layers + [keras.layers.Dense(4, name="after")])
        model.compile("sgd", "mse")
        return model

    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(64, 8)).astype("float32"), rng.normal(size=(64, 4)).astype("float32")
    clean = parity_check(build(False), x, y)
    assert clean.flagged == [] and clean.tolerance == 1e-2
    assert abs(clean.loss - clean.reference_loss) < 1e-3 * clean.reference_loss
    assert max(r.rel_error for r in clean.rows) > 0  # float16 really ran

    model = build(True)
    report = parity_check(model, x, y)
    outputs = {r.name.split("/")[-1]: r for r in report.rows if r.kind == "output"}
    assert outputs["before"].rel_error < 1e-2 < outputs["cancel"].rel_error
    assert report.flagged[0].name.endswith("cancel")
    assert "sequential" in str(report) and "above tolerance" in str(report)
    assert model.get_layer("cancel").compute_dtype == "float16"  # the model is unchanged


def test_diagnosis_commands_run_on_a_gpt_and_a_corpus_batch(tmp_path, capsys):
    from kmp.cli import main

    common = ["--corpus", "tests/data/corpus.txt", "--vocab-size", "320", "--num-layers", "1",
              "--hidden-dim", "32", "--num-heads", "2", "--intermediate-dim", "64",
              "--seq-len", "32", "--batch-size", "2", "--cache-dir", str(tmp_path / "cache"),
              "--precision", "mixed_float16", "--out", str(tmp_path)]
    assert main(["audit", *common]) == 0
    assert "| transformer_layer_0/self_attention/query | EinsumDense |" in capsys.readouterr().out
    assert main(["parity", *common]) == 0
    assert "mixed_float16 against float32" in capsys.readouterr().out
    assert main(["trace", *common, "--loss-scale", "1e30"]) == 0
    out = capsys.readouterr().out  # the scaled loss overflows float16 at the logits first
    assert "output gradient (backward order): token_embedding (gradient): float16" in out
    assert "... and " in out and "first non-finite output (forward order): none" in out
    assert main(["grads", *common]) == 0
    assert "suggested initial loss scale" in capsys.readouterr().out
    assert (tmp_path / "gradients.png").stat().st_size > 10_000
    assert main(["audit", *common, "--run", str(tmp_path)]) == 2
    assert "is not a finished kmp pretrain run" in capsys.readouterr().err
