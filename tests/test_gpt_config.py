import argparse
import json

import pytest

from kmp.gpt import PRESETS, GPTConfig, add_arguments, from_args, preset


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(argv))


def test_defaults_are_the_tiny_preset():
    assert GPTConfig() == preset("tiny")


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_valid_and_tensor_core_friendly(name):
    cfg = preset(name)
    assert cfg.preset == name and cfg.vocab_size % 64 == 0
    assert cfg.hidden_dim % cfg.num_heads == 0 and cfg.hidden_dim % 8 == 0


def test_gpt2_124m_is_gpt2_small():
    cfg = preset("gpt2-124m")
    shape = (cfg.num_layers, cfg.hidden_dim, cfg.num_heads, cfg.seq_len, cfg.vocab_size)
    assert shape == (12, 768, 12, 1024, 50304)


def test_every_field_overrides_from_the_command_line():
    cfg = parse("--preset", "small", "--steps", "7", "--batch-size", "3", "--precision",
                "float32", "--no-jit", "--learning-rate", "0.5", "--out", "x", "--resume",
                "--warmup-steps", "2")
    assert (cfg.preset, cfg.steps, cfg.batch_size, cfg.precision) == ("small", 7, 3, "float32")
    assert (cfg.jit, cfg.learning_rate, cfg.out, cfg.resume) == (False, 0.5, "x", True)
    assert cfg.num_layers == preset("small").num_layers  # untouched fields keep the preset's
    assert parse("--jit").jit is True and parse().jit is None


def test_config_round_trips_through_json():
    cfg = preset("small", seed=3)
    assert GPTConfig(**json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"steps": 0}, "steps must be a positive integer. Received: steps=0"),
        ({"batch_size": -2}, "batch_size must be a positive integer"),
        ({"num_heads": 3}, "hidden_dim must be divisible by num_heads"),
        ({"precision": "fp16"}, "Unknown precision 'fp16'"),
        ({"strategy": "tpu"}, "Unknown strategy 'tpu'"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"bogus": 1}, "Unknown config field"),
        ({"learning_rate": -1e-3}, "learning_rate must be a finite number > 0"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
        ({"grad_clip": float("inf")}, "grad_clip must be a finite number >= 0"),
        ({"warmup_steps": 700, "steps": 600}, "warmup_steps must be an integer from 0 to"),
        ({"seed": -1}, "seed must be an integer >= 0. Received: seed=-1"),
    ],
)
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown preset 'huge'. Use one of: tiny, small"):
        preset("huge")


def test_param_count_matches_the_built_model():
    import kmp.gpt as gpt

    for config in (gpt.preset("tiny"), gpt.preset("tiny", num_layers=3, vocab_size=1000),
                   gpt.preset("gpt2-124m")):
        model = gpt.build_model(config)
        assert model.count_params() == gpt.param_count(config)
    # GPT-2 small: 124.4M with the 50257-token vocabulary (Radford et al. 2019 report 117M with
    # a different count); 6N + 12·L·H·Q·T per token.
    config = gpt.preset("gpt2-124m", vocab_size=50257)
    assert gpt.param_count(config) == 124_439_808 + 47 * 768
    assert gpt.flops_per_token(config) == (6 * (gpt.param_count(config) - 1024 * 768)
                                           + 12 * 12 * 768 * 1024)


def test_intervals_divide_the_steps_left():
    assert preset("tiny", steps=600, val_every=100).intervals() == (100, 6)
    assert preset("tiny", steps=250, val_every=100).intervals() == (50, 5)
    assert preset("tiny", steps=30, val_every=100).intervals() == (30, 1)
    # A resumed run: the steps left after the checkpoint, whatever the old interval was.
    assert preset("tiny", steps=250, val_every=100).intervals(done=100) == (75, 2)
    assert preset("tiny", steps=8, val_every=2).intervals(done=4) == (2, 2)
    with pytest.raises(ValueError, match="already trained 8 steps"):
        preset("tiny", steps=8, val_every=4).intervals(done=8)
    with pytest.raises(ValueError, match="the 101 steps left after step 100 has no divisor"):
        preset("tiny", steps=201, val_every=100).intervals(done=100)


def test_a_saved_config_with_unknown_fields_loads_with_a_warning():
    from kmp.gpt.config import from_json

    data = {**json.loads(preset("tiny", steps=20, val_every=10).to_json()), "future_knob": 3}
    with pytest.warns(UserWarning, match="future_knob"):
        config = from_json(data)
    assert config.steps == 20
    with pytest.raises(TypeError):  # what GPTConfig(**json) did
        GPTConfig(**data)


def test_logits_dtype_follows_the_config():
    import keras
    import numpy as np

    import kmp.gpt as gpt

    keras.config.set_dtype_policy("mixed_bfloat16")
    x = {"token_ids": np.ones((1, 8), "int32"), "padding_mask": np.ones((1, 8), "int32")}
    for logits, dtype in (("compute", "bfloat16"), ("float32", "float32")):
        model = gpt.build_model(gpt.preset("tiny", num_layers=1, hidden_dim=32,
                                           intermediate_dim=64, logits=logits))
        assert keras.backend.standardize_dtype(model(x).dtype) == dtype


def test_every_option_has_help_from_the_docstring():
    import argparse
    import dataclasses

    import kmp.gpt as gpt

    parser = argparse.ArgumentParser()
    gpt.add_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    for f in dataclasses.fields(gpt.GPTConfig):
        assert len(helps[f.name]) > len(" (default: the preset's)") + 3, f.name
    assert helps["num_heads"].startswith("int. Attention heads per block.")
    assert "largest divisor" in helps["val_every"]


def test_reading_a_config_loads_neither_keras_nor_a_recipe_module():
    import subprocess
    import sys

    code = ("import sys; from kmp.gpt.config import preset, from_json; preset('small'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'keras' "
            "or m in ('kmp.faults', 'kmp.recovery', 'kmp.gpt.model')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_no_public_name_is_also_a_submodule_name():
    # `import kmp.gpt.X` sets the package's attribute X to the module: a function exported
    # under the same name would turn into a module once anything imported the submodule.
    import importlib
    import pkgutil

    for package in (importlib.import_module("kmp"), importlib.import_module("kmp.gpt")):
        modules = {m.name for m in pkgutil.iter_modules(package.__path__)}
        assert not {n for n, m in package._EXPORTS.items() if m and n in modules}, package
