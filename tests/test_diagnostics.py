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
