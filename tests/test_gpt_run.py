"""A finished run (kmp.gpt.run): read from its directory whatever version wrote it, rebuilt
exactly as it trained (a recovery's float32 residual, float8), its tokenizer attached; and
what quantizes a float8 run."""

import json
import math
import shutil
from pathlib import Path

import keras
import pytest

import kmp
from kmp.gpt import data, open_run
from kmp.gpt import quantize as q

CORPUS = str(Path(__file__).parent / "data" / "corpus.txt")


def _write_run(path, config=None, weights=True, record=None, metrics=None):
    """A run directory by hand: config.json, an (empty) model.keras, records."""
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(config if isinstance(config, str)
                                          else json.dumps(config))
    if weights:
        (path / "model.keras").write_bytes(b"")
    if record is not None:
        (path / "checkpoints").mkdir(exist_ok=True)
        (path / "checkpoints" / "latest.json").write_text(json.dumps(record))
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def _copy(run, to, **record_changes):
    """A copy of `run` whose checkpoint record has `record_changes` (None: key removed)."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("tensorboard"))
    path = to / "checkpoints" / "latest.json"
    record = json.loads(path.read_text())
    for key, value in record_changes.items():
        record.pop(key, None)
        if value is not None:
            record[key] = value
    path.write_text(json.dumps(record))
    return to


@pytest.mark.parametrize("case,message", [
    ("file", "is not a directory"),
    ("empty", "no config.json"),
    ("damaged", "config.json is damaged"),
    ("list", "holds a JSON list"),
    ("invalid", "invalid config: num_layers must be a positive integer"),
    ("no weights", "no weights"),
])
def test_what_is_not_a_run_says_so_in_one_line(case, message, tmp_path):
    run = tmp_path / "run"
    if case == "file":
        run.write_text("")
    else:
        config = {"damaged": '{"vocab_size": 5', "list": "[1, 2]",
                  "invalid": {"num_layers": 0}}.get(case, {} if case != "empty" else None)
        _write_run(run, config, weights=case != "no weights")
    with pytest.raises(kmp.UserError, match=message) as info:
        open_run(run)
    assert "\n" not in str(info.value)


def test_weights_that_do_not_fit_are_a_user_error(tmp_path):
    run = open_run(_write_run(tmp_path, {"num_layers": 1}, metrics={"policy": "float32"}))
    with pytest.raises(kmp.UserError, match="does not hold this run's weights"):
        run.model(preprocessor=False)  # model.keras is empty here


def test_unknown_config_fields_are_ignored_with_one_warning_and_missing_take_defaults(tmp_path):
    lines = []
    run = open_run(_write_run(tmp_path, {"num_layers": 3, "moe_experts": 8, "rope": True},
                              metrics={"policy": "mixed_float16"}), log=lines.append)
    assert run.config.num_layers == 3 and run.config.hidden_dim == 128  # a default
    assert len(lines) == 1 and "moe_experts, rope" in lines[0]
    assert run.policy == "mixed_float16" and not run.float8 and not run.float32_residual
    assert run.steps_read == 600  # the config's steps, without a checkpoint record


def test_steps_read_counts_a_recoverys_skipped_windows(tmp_path):
    recovery = {"skip": [[5, 9], [30, 31]], "policy": "mixed_bfloat16",
                "float32_residual": True}
    record = {"weights": "x.weights.h5", "step": 18, "batches": 40,
              "extra": {"recovery": recovery}}
    run = open_run(_write_run(tmp_path / "a", {"steps": 40, "val_every": 10}, record=record))
    # 40 batches read around two skipped windows (5 + 2 positions): the next unread is 47.
    assert run.steps_read == 47
    assert run.policy == "mixed_bfloat16" and run.float32_residual  # a recovery's changes
    old = {**record, "epoch": 4}  # kmp <= 0.1.0: epochs of val_every steps, no batches
    del old["batches"]
    assert open_run(_write_run(tmp_path / "b", {"steps": 40, "val_every": 10},
                               record=old)).steps_read == 47
    stored = {**record, "position": 52}  # the checkpoint's own record wins
    assert open_run(_write_run(tmp_path / "c", {"steps": 40}, record=stored)).steps_read == 52


def test_model_is_rebuilt_as_trained_and_generates(micro_run, tmp_path):
    run = open_run(micro_run)
    assert run.policy == "mixed_bfloat16" and not run.float8
    val = data.val_dataset(run.cache(), run.config.seq_len, run.config.batch_size,
                           run.config.val_batches)
    model = run.model(preprocessor=False)
    assert model.dtype_policy.name == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left alone
    trained = json.loads((micro_run / "metrics.json").read_text())["val_loss"]
    assert abs(q.val_loss(model, val) / trained - 1) < 1e-3
    text = run.model().generate("def", max_length=8)
    assert isinstance(text, str) and text.startswith("def")
    # A recovery's float32 residual stream (its last rung) is rebuilt.
    recovery = {"skip": [], "policy": "mixed_bfloat16", "float32_residual": True}
    copy = _copy(micro_run, tmp_path / "run", extra={"recovery": recovery})
    assert open_run(copy).model(preprocessor=False).backbone.float32_residual


@pytest.fixture(scope="module")
def float8_run(tmp_path_factory):
    """A finished micro run trained in float8 (4 steps)."""
    from conftest import MICRO

    from kmp.recipes import pretrain_gpt

    root = tmp_path_factory.mktemp("float8")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in MICRO.items()]
    assert pretrain_gpt.main([*flags, "--corpus", CORPUS, "--steps", "4", "--val-every", "4",
                              "--warmup-steps", "1", "--samples", "0", "--precision",
                              "mixed_bfloat16", "--float8", "--cache-dir",
                              str(root / "cache"), "--out", str(root / "run")]) == 0
    keras.config.set_dtype_policy("float32")
    return root / "run"


def test_a_float8_run_is_rebuilt_in_float8_and_quantizes(float8_run, tmp_path):
    run = open_run(float8_run)
    assert run.float8
    modes = {getattr(layer, "quantization_mode", None)
             for layer in run.model(preprocessor=False)._flatten_layers()}
    assert "float8" in modes
    plain = run.model(float8=False, preprocessor=False)
    assert "float8" not in {getattr(layer, "quantization_mode", None)
                            for layer in plain._flatten_layers()}
    rows = q.quantize_run(float8_run, ["int8", "int4"], tmp_path / "q", calibration_batches=1,
                          log=lambda *a: None)
    assert [r.mode for r in rows] == ["source (mixed_bfloat16, float8)", "int8", "int4"]
    trained = json.loads((float8_run / "metrics.json").read_text())["val_loss"]
    assert abs(rows[0].val_loss / trained - 1) < 1e-3  # the source is the float8 model
    for r in rows[1:]:
        assert math.isfinite(r.val_loss) and abs(r.delta_vs_source) < 0.05
        assert abs(r.reload_val_loss / r.val_loss - 1) < 1e-5
        assert "float weights" in r.note


def test_quantized_files_carry_the_tokenizer(micro_run, tmp_path):
    q.quantize_run(micro_run, ["int8"], tmp_path, calibration_batches=1, log=lambda *a: None)
    for name in ("source.keras", "int8.keras"):
        model = keras.saving.load_model(tmp_path / name)
        text = model.generate("def", max_length=8)
        assert isinstance(text, str) and text.startswith("def"), name
