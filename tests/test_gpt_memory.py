"""The GPT training-memory estimate, and the resident state kmp bench counts."""

import pytest

import kmp.gpt as gpt
from kmp.cli import main
from kmp.gpt.memory import estimate_memory, memory_table, param_count

pytestmark = pytest.mark.backends


def test_parameter_bytes_match_the_built_model_exactly():
    config = gpt.preset("tiny", num_layers=3, vocab_size=1000)
    est = estimate_memory(config, "mixed_bfloat16")
    n = gpt.build_model(config).count_params()  # every variable is float32 under Keras
    assert est.parameters == 4 * n and est.optimizer == 8 * n
    accum = estimate_memory(gpt.preset("tiny", num_layers=3, vocab_size=1000, grad_accum=4),
                            "float32")
    assert accum.optimizer == 12 * n  # Keras's float32 gradient accumulators


@pytest.mark.parametrize("overrides", [{}, {"num_layers": 3, "vocab_size": 1000,
                                         "intermediate_dim": 384, "seq_len": 64}])
def test_closed_form_parameter_count_matches_the_built_model(overrides):
    config = gpt.preset("tiny", **overrides)
    assert param_count(config) == gpt.build_model(config).count_params()


def test_the_estimate_and_the_plan_load_neither_tensorflow_nor_keras_hub():
    import subprocess
    import sys

    # the commands' own modules (kmp.cli imports the backend before any command, for quiet
    # output); the closed-form parameter count stands in for building the model
    code = ("import sys; from kmp.gpt import memory, plan; memory.main(['--preset', 'gpt2-1.5b',"
            " '--mesh', 'data=8', '--shard', 'fsdp', '--remat', 'blocks']); plan.main(['--params',"
            " '1b', '--device', 'rtx4070-8gb', '--check', 'none']); "
            "print(sorted(m for m in ('tensorflow', 'keras_hub', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "KERAS_BACKEND": "tensorflow"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_sharded_estimate_counts_what_xla_keeps():
    """fsdp: the gathered weights of every layer without remat; with remat, at the backward
    pass's end, the whole gradients of the first half of the layers (docs/memory.md)."""
    whole = gpt.preset("gpt2-1.5b", batch_size=64, remat="blocks")
    sharded = gpt.preset("gpt2-1.5b", batch_size=64, remat="blocks", mesh="data=8",
                         shard="fsdp")
    est = estimate_memory(sharded, "mixed_bfloat16")
    layer = 4 * 1600**2 + 3 * 1600 + 2 * 1600 * 6400 + 6400 + 6 * 1600
    waiting = 48 // 2 - 2
    assert est.gradients == 2 * (waiting * layer + (48 - waiting) * layer // 8) + (
        50304 * 1600 * 4 // 8)
    assert est.gradients > estimate_memory(whole, "mixed_bfloat16", 8).gradients // 8
    none = dict(batch_size=64, mesh="data=8", shard="fsdp")
    assert (estimate_memory(gpt.preset("gpt2-1.5b", **none), "mixed_bfloat16").activations
            - estimate_memory(gpt.preset("gpt2-1.5b", batch_size=8), "mixed_bfloat16")
            .activations) > 48 * layer * 2  # the gathered weights kept for the backward


def test_activation_formula_by_hand():
    # tiny: s=128, b=16, h=128, i=512, a=4, L=2, V=2048; logits in the compute dtype.
    config = gpt.preset("tiny")
    n = param_count(config)
    tokens, embedding = 128 * 16, 2048 * 128 * 4
    for policy, c in (("float32", 4), ("mixed_float16", 2)):
        # seq x seq: float32 + compute dtype; per token: 8h + i in the compute dtype, GELU's
        # input once more in float32
        layer = 4 * 128 * 128 * 16 * (4 + c) + tokens * ((8 * 128 + 512) * c + 4 * 512)
        est = estimate_memory(config, policy)
        begin = 2 * layer + tokens * 2048 * c + 3 * embedding
        assert begin > 4 * n + layer  # the peak: where the backward pass begins
        assert est.gradients == embedding
        assert est.total == 16 * n - 4 * n + begin
    remat = estimate_memory(gpt.preset("tiny", remat="blocks"), "float32")
    assert remat.activations < estimate_memory(config, "float32").activations
    assert remat.total >= 16 * n  # weights, gradients and both moments at the least
    with pytest.raises(ValueError, match="Unknown policy 'fp16'"):
        estimate_memory(config, "fp16")


def test_memory_command_prints_every_policy(capsys):
    assert main(["memory", "--preset", "gpt2-124m"]) == 0
    out = capsys.readouterr().out
    assert "| mixed_bfloat16 | 0.464 | 0.144 | 0.927 |" in out and "| float32 |" in out
    gib = 2**30
    table = memory_table(gpt.preset("gpt2-124m"), {"float32": 40 * gib, "mixed_float16": 25 * gib})
    est = estimate_memory(gpt.preset("gpt2-124m"), "float32")
    assert est.row().startswith("| float32 | 0.464 | 0.144 | 0.927 |") and est.row() in table
    assert f"| 40.000 | {est.total / gib / 40:.2f} |" in table and "| - | - |" in table


@pytest.mark.parametrize("policy,remat", [("float32", "none"), ("mixed_bfloat16", "blocks")])
def test_estimate_is_within_10_percent_of_xlas_h100_plan(policy, remat):
    """The estimate against the plan XLA compiles for an H100 (compile-only devices of the JAX
    CUDA plugin, nothing allocated) on the small preset; the GPT-2 sizes are in docs/memory.md."""
    import keras

    from kmp.gpt.compiled import compile_step

    if keras.backend.backend() != "jax":
        pytest.skip("compiles in this process on JAX; test_memory_compile_command covers a "
                    "child JAX process from the other backends")
    config = gpt.preset("small", remat=remat)
    plan = compile_step(config, policy, "h100")
    est = estimate_memory(config, policy)
    assert plan.weights == est.parameters
    assert 0 < plan.optimizer - est.optimizer <= 16  # AdamW's step counter (and the lr's)
    assert abs(est.total / plan.total - 1) < 0.10, (est.total, plan.total)


@pytest.mark.backends("jax")  # under torch, the same child process as under TensorFlow
def test_memory_compile_command(tmp_path, capsys):
    """`kmp memory --measure compile` from any backend: a child JAX process compiles (under
    JAX, this process)."""
    import json

    out = tmp_path / "memory.json"
    assert main(["memory", "--preset", "small", "--num-layers", "2", "--precision",
                 "mixed_float16", "--measure", "compile", "--gemm", "triton", "--json",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| mixed_float16 | none | estimate |" in printed and "XLA h100, triton" in printed
    result = json.loads(out.read_text())
    ratio = result["estimate_total_bytes"] / result["compiled_total_bytes"]
    assert 0.9 < ratio < 1.1, ratio
    plan = result["compiled"]["triton"]
    assert plan["total"] == plan["argument"] + plan["output"] - plan["alias"] + plan["temp"]
    assert plan["weights"] == result["estimate"]["parameters"]


def test_memory_options_fail_in_one_line(capsys):
    assert main(["memory", "--preset", "tiny", "--measure", "compile", "--target", "h900"]) == 2
    assert capsys.readouterr().err.startswith("kmp: error: --target: Unknown GPU 'h900'. Use "
                                              "one of: h100, h200, a100, l4, h100-80gb")
    assert main(["memory", "--preset", "tiny", "--gpus", "2"]) == 2
    assert "add --measure compile" in capsys.readouterr().err


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
