"""The training-memory estimate."""

import pytest

import kmp.gpt as gpt
from kmp.cli import main
from kmp.diagnostics import estimate_memory


def test_parameter_bytes_match_the_built_model_exactly():
    config = gpt.preset("tiny", num_layers=3, vocab_size=1000)
    est = estimate_memory(config, "mixed_bfloat16")
    n = gpt.build_model(config).count_params()  # every variable is float32 under Keras
    assert est.parameters == 4 * n and est.gradients == 4 * n and est.optimizer == 8 * n


def test_activation_formula_by_hand():
    # tiny: s=128, b=16, h=128, a=4, L=2, V=2048.
    config = gpt.preset("tiny")
    per_layer = 128 * 16 * 128 * 34 + 5 * 4 * 128 * 128 * 16  # Korthikanti et al. 2022, eq. 2
    logits = 2 * 16 * 128 * 2048 * 4
    assert estimate_memory(config, "mixed_float16").activations == 2 * per_layer + logits
    assert estimate_memory(config, "float32").activations == 2 * 2 * per_layer + logits
    accum = estimate_memory(gpt.preset("tiny", grad_accum=4), "float32")
    assert accum.gradients == 2 * estimate_memory(config, "float32").gradients
    with pytest.raises(ValueError, match="Unknown policy 'fp16'"):
        estimate_memory(config, "fp16")


def test_memory_command_prints_every_policy(capsys):
    assert main(["memory", "--preset", "gpt2-124m"]) == 0
    out = capsys.readouterr().out
    assert "| mixed_bfloat16 | 0.464 | 0.464 | 0.927 |" in out and "| float32 |" in out


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
