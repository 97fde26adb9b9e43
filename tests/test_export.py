"""`kmp export --format litert` (kmp.gpt.export) on a finished mixed_bfloat16 micro run: the
file runs in the LiteRT interpreter and computes what Keras does, in every dtype."""

import json

import keras
import pytest
from _helpers import snapshot

from kmp.cli import main


def test_each_dtype_exports_runs_in_litert_and_is_priced(micro_run, tmp_path, capsys):
    before = snapshot(micro_run)
    results = {}
    for dtype in ("float32", "float16", "int8", "int8-dynamic"):
        out = tmp_path / dtype / "gpt.tflite"
        assert main(["export", "--run", str(micro_run), "--format", "litert", "--dtype", dtype,
                     "--out", str(out), "--windows", "4"]) == 0
        r = results[dtype] = json.loads((out.parent / "gpt.export.json").read_text())
        assert r["size_bytes"] == out.stat().st_size and r["windows"] == 4
        assert r["policy"] == "mixed_bfloat16"  # rebuilt in float32 to export
        assert abs(r["keras_policy_val_loss"] / r["keras_val_loss"] - 1) < 0.01
    f32, f16 = results["float32"], results["float16"]
    # float32: the file is the Keras model (the trained mixed model's weights, float32 math).
    assert f32["max_abs_logit_diff"] < 1e-4, f32
    assert abs(f32["litert_val_loss"] / f32["keras_val_loss"] - 1) < 1e-5
    # float16 weights: smaller (about half at the tiny preset; the graph is a larger share of
    # this micro model's file), a rounding's worth of difference.
    assert f16["size_bytes"] < 0.75 * f32["size_bytes"]
    assert 0 < f16["max_abs_logit_diff"] < 0.05
    assert abs(f16["litert_val_loss"] / f16["keras_val_loss"] - 1) < 1e-3
    for dtype in ("int8", "int8-dynamic"):  # int8 weights: smaller again, and a price
        r = results[dtype]
        assert r["size_bytes"] < f16["size_bytes"]
        assert r["max_abs_logit_diff"] > f16["max_abs_logit_diff"]
        assert abs(r["litert_val_loss"] / r["keras_val_loss"] - 1) < 0.25, r
    assert snapshot(micro_run) == before  # the run is only read
    capsys.readouterr()

    assert main(["export", "--run", str(micro_run), "--dtype", "int3", "--out",
                 str(tmp_path / "x.tflite")]) == 2
    assert main(["export", "--run", str(micro_run), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "Unknown export dtype 'int3'" in err[0] and ".tflite" in err[1]


def test_exports_into_one_folder_keep_their_records_and_leave_the_policy(micro_run, tmp_path):
    from kmp.gpt import export_run

    for name, dtype in (("model-f32", "float32"), ("model-int8", "int8-dynamic")):
        export_run(micro_run, tmp_path / f"{name}.tflite", dtype, windows=2,
                   log=lambda *a: None)
        assert keras.config.dtype_policy().name == "float32"  # not the run's mixed_bfloat16
    records = sorted(p.name for p in tmp_path.glob("*.json"))
    assert records == ["model-f32.export.json", "model-int8.export.json"]
    assert json.loads((tmp_path / "model-int8.export.json").read_text())["dtype"] == (
        "int8-dynamic")


def test_a_failed_conversion_leaves_tensorflows_log_level(tmp_path, monkeypatch):
    import tensorflow as tf

    from kmp.gpt import build_model, preset
    from kmp.gpt.export import convert

    model = build_model(preset("tiny", vocab_size=320, num_layers=1, hidden_dim=16,
                               intermediate_dim=32, seq_len=8))

    def broken(*args, **kwargs):
        raise RuntimeError("converter failed")

    monkeypatch.setattr(keras.Model, "export", broken)
    level = tf.get_logger().level
    try:
        tf.get_logger().setLevel("WARNING")
        with pytest.raises(RuntimeError, match="converter failed"):
            convert(model, tmp_path / "gpt.tflite", 8)
        assert tf.get_logger().level == 30  # WARNING, as it was
    finally:
        tf.get_logger().setLevel(level)
