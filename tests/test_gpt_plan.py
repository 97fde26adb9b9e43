"""`kmp plan`: what fits on a GPU, from the estimate checked against XLA's plan."""

import pytest

from kmp.cli import main
from kmp.gpt.config import preset
from kmp.gpt.memory import estimate_memory, param_count
from kmp.gpt.plan import parse_params, shape_for_params, what_fits

pytestmark = pytest.mark.backends


@pytest.mark.parametrize("text,n", [("125m", 125e6), ("1b", 1e9), ("1.3b", 1.3e9), ("7b", 7e9)])
def test_a_parameter_count_becomes_a_gpt_shape_of_that_size(text, n):
    config = shape_for_params(parse_params(text))
    assert abs(param_count(config) / n - 1) < 0.06
    assert 48 <= config.hidden_dim / config.num_layers <= 128
    assert config.hidden_dim % config.num_heads == 0 and config.hidden_dim % 128 == 0


def test_1b_on_an_8gb_laptop_gpu_does_not_fit_and_says_why_and_what_would(capsys):
    assert main(["plan", "--params", "1b", "--device", "rtx4070-8gb", "--check", "none"]) == 1
    out = capsys.readouterr().out
    assert "does not fit: the float32 weights, gradients and AdamW's two moments alone need " \
           "15.1 GiB" in out
    # without remat, fsdp keeps every layer's gathered weights for the backward pass (XLA's
    # plan, docs/memory.md): tp splits them instead
    assert "it fits on 4 such GPUs: mixed_bfloat16, remat none, --mesh data=1,model=4 " \
           "--shard tp." in out
    assert "on one such GPU, a GPT of about" in out


def test_the_cheapest_setting_that_fits_comes_first():
    config = preset("gpt2-124m")
    settings = what_fits(config, 8 * 2**30, devices=1, global_batch=64, capability=(8, 9))
    fits = [s for s in settings if s.fits]
    assert fits and fits[0] == settings[0]
    assert (fits[0].precision, fits[0].remat) == ("mixed_bfloat16", "none")
    for s in fits:  # the micro-batch is the largest that fits, and reaches the global batch
        assert s.micro_batch * s.grad_accum >= 64 and s.bytes <= 0.9 * 8 * 2**30
        bigger = estimate_memory(config.__class__(**{
            **config.__dict__, "batch_size": 2 * s.micro_batch, "remat": s.remat,
            "grad_accum": max(1, s.grad_accum // 2)}), s.precision).total
        assert bigger > 0.9 * 8 * 2**30 or 2 * s.micro_batch > 64
    # float16 needs loss scaling, whose update keeps four float32 copies per parameter
    f16 = next(s for s in settings if s.precision == "mixed_float16" and s.remat == "blocks")
    bf16 = next(s for s in settings if s.precision == "mixed_bfloat16" and s.remat == "blocks")
    assert f16.micro_batch <= bf16.micro_batch


def test_sharding_divides_the_state_per_device():
    config = preset("gpt-6.7b", batch_size=8)
    whole = estimate_memory(config, "mixed_bfloat16")
    for mesh, shard, split in (("data=8", "fsdp", 8), ("model=8", "tp", 8),
                               ("data=2,model=4", "fsdp+tp", 8)):
        sharded = estimate_memory(preset("gpt-6.7b", batch_size=8, mesh=mesh, shard=shard),
                                  "mixed_bfloat16")
        assert abs(sharded.parameters * split / whole.parameters - 1) < 0.02, shard
        assert abs(sharded.optimizer * split / whole.optimizer - 1) < 0.02, shard


@pytest.mark.backends("jax")  # under torch, the same child process as under TensorFlow
def test_plan_checks_its_choice_by_compiling_for_the_gpu(capsys):
    assert main(["plan", "--preset", "small", "--device", "l4-24gb", "--global-batch",
                 "32"]) == 0
    out = capsys.readouterr().out
    assert "cheapest that fits: mixed_bfloat16, remat none, micro-batch 32 x 1" in out
    assert "XLA's plan for l4-24gb:" in out and ": fits" in out


def test_unknown_device_is_one_line(capsys):
    assert main(["plan", "--params", "1b", "--device", "rtx9090"]) == 2
    assert capsys.readouterr().err.startswith("kmp: error: --device: Unknown GPU 'rtx9090'.")


def test_fused_attention_is_counted_as_a_flash_kernel_stores_it():
    island = estimate_memory(preset("gpt2-124m", batch_size=8, attention="island"),
                             "mixed_bfloat16")
    fused = estimate_memory(preset("gpt2-124m", batch_size=8, attention="fused"),
                            "mixed_bfloat16")
    scores = 12 * 12 * 1024 * 1024 * 8 * (4 + 2)  # two seq x seq arrays per head and layer
    stats = 12 * 12 * 1024 * 8 * 4  # the softmax statistics a flash kernel keeps
    assert island.activations - fused.activations == scores - stats
    assert estimate_memory(preset("gpt2-124m", attention="fused"), "float32") == estimate_memory(
        preset("gpt2-124m", attention="island"), "float32")  # nothing to fuse in float32
