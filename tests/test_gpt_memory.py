"""The GPT training-memory estimate, and the resident state kmp bench counts."""

import pytest

import kmp.gpt as gpt
from kmp.cli import main
from kmp.gpt.memory import estimate_memory, memory_table

pytestmark = pytest.mark.backends


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
    gib = 2**30
    table = memory_table(gpt.preset("gpt2-124m"), {"float32": 40 * gib, "mixed_float16": 25 * gib})
    assert "| float32 | 0.464 | 0.464 | 0.927 | 38.2" in table  # 40.1 GiB estimated
    assert "| 40.000 | 1.00 |" in table and "| 25.000 | 0.96 |" in table and "| - | - |" in table


def test_bench_counts_a_models_resident_state_as_the_estimate_does():
    # kmp bench subtracts the other models' resident bytes from the GPU peak and adds back
    # this model's: its variables plus the optimizer's (AdamW moments, loss-scale counters).
    import keras

    import kmp
    from kmp.gpt.memory import state_bytes

    config = gpt.preset("tiny", num_layers=3, vocab_size=1000)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = gpt.build_model(config)
        optimizer = kmp.compile(model, gpt.make_optimizer(config, model), loss="mse")
    finally:
        keras.config.set_dtype_policy("float32")
    optimizer.build(model.trainable_variables)
    est = estimate_memory(config, "mixed_float16")
    extra = state_bytes(model) - (est.parameters + est.optimizer)
    assert 0 < extra < 1024, extra  # iterations, learning rate, scale and its counters
