"""Export a finished `kmp pretrain` run for devices (LiteRT, formerly TFLite) and check it.

Keras 3.15 exports through a SavedModel and TensorFlow's converter (`Model.export(...,
format="litert")`, TensorFlow backend only). kmp adds what a trained run needs:

- one input, `token_ids` (batch 1, the run's window), with the padding mask built inside;
- the model rebuilt under float32 with the run's weights, whatever policy it trained under
  (the float32 master weights are what the file stores; a device picks its own arithmetic);
- the weight formats a device takes: float32; float16 (weights stored half, computed float32
  on CPUs); int8 (weights and activations int8 where the converter can, activations
  calibrated on windows of the run's training tokens, float elsewhere); int8-dynamic (int8
  weights, float activations: no calibration, and far closer to float on a GPT);
- a check: the file runs in the LiteRT interpreter (`ai-edge-litert` when installed, else
  TensorFlow's) on validation windows, against the Keras model it came from.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from pathlib import Path

import keras
import numpy as np

from kmp.checkpoint import write_bytes_atomic
from kmp.errors import UserError
from kmp.gpt import data
from kmp.gpt.run import open_run

DTYPES = ("float32", "float16", "int8", "int8-dynamic")


def _single_input(model, seq_len: int):
    """`model` as a functional model of `token_ids` alone (every position real)."""
    ids = keras.Input((seq_len,), batch_size=1, dtype="int32", name="token_ids")
    logits = model({"token_ids": ids, "padding_mask": keras.ops.ones_like(ids)})
    return keras.Model(ids, logits, name="gpt_litert")


def convert(model, path, seq_len: int, dtype: str = "float32", representative=None) -> int:
    """Writes `model` (a float32 kmp GPT) to a `.tflite` file, atomically.

    Args:
        model: the GPT, built under float32.
        path: str or Path ending in ".tflite".
        seq_len: int. The window the file takes (batch 1).
        dtype: str. One of `DTYPES`.
        representative: int array (samples, seq_len): calibration windows, for "int8".

    Returns:
        The file's size in bytes.
    """
    import tensorflow as tf

    kwargs = {}
    if dtype != "float32":
        kwargs["optimizations"] = [tf.lite.Optimize.DEFAULT]
    if dtype == "float16":
        kwargs["target_spec"] = {"supported_types": [tf.float16]}
    if dtype == "int8":
        kwargs["representative_dataset"] = lambda: ([w[None].astype(np.int32)]
                                                    for w in representative)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.tflite")
    wrapped = _single_input(model, seq_len)
    logger, level = tf.get_logger(), tf.get_logger().level  # "Assets written to" lines
    logger.setLevel("ERROR")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped.export(str(tmp), format="litert", verbose=False, input_signature=[
                tf.TensorSpec((1, seq_len), tf.int32, name="token_ids")], **kwargs)
    finally:
        logger.setLevel(level)
    os.replace(tmp, path)
    return path.stat().st_size


def interpreter(path):
    """A LiteRT interpreter for `path`: ai-edge-litert's, else TensorFlow's (deprecated)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Interpreter = tf.lite.Interpreter  # noqa: N806
    runner = Interpreter(model_path=str(path))
    runner.allocate_tensors()
    return runner


def run_file(runner, windows) -> np.ndarray:
    """Logits (n, seq_len, vocab) of the interpreter over int windows (n, seq_len)."""
    (inp,), (out,) = runner.get_input_details(), runner.get_output_details()
    logits = []
    for w in windows:
        runner.set_tensor(inp["index"], w[None].astype(np.int32))
        runner.invoke()
        logits.append(runner.get_tensor(out["index"])[0].astype(np.float32))
    return np.stack(logits)


def mean_loss(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean next-token cross-entropy of float logits, in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-np.take_along_axis(log_probs, targets[..., None], axis=-1).mean())


def record_path(out) -> Path:
    """Where `export_run` writes the record of the .tflite file `out`: beside it, named after
    it, so exports into one folder keep their own records.

    Example:
    >>> record_path("out/model-int8.tflite").name
    'model-int8.export.json'
    """
    return Path(out).with_suffix(".export.json")


def export_run(run, out, dtype: str = "float32", windows: int = 16,
               calibration_windows: int = 32, log=print) -> dict:
    """Exports a finished run to LiteRT and compares the file with Keras on validation data.

    Writes `out` (the .tflite file) and its record beside it, named after it (`record_path`:
    gpt.tflite's is gpt.export.json): size_bytes, max_abs_logit_diff (file vs the float32
    Keras model it came from), val_loss in Keras (float32 rebuild and, for a mixed or float8
    run, the model as it trained) and in LiteRT, over the first `windows` validation windows.
    The global dtype policy and TensorFlow's log level are left as they were.

    Args:
        run: str or Path. A `kmp pretrain` --out directory (only read).
        out: str or Path. The .tflite file to write.
        dtype: str. "float32", "float16", "int8" or "int8-dynamic".
        windows: int. Validation windows (batch 1 each) to compare on.
        calibration_windows: int. Training windows that calibrate int8 activations.
        log: callable. Where progress lines go.

    Returns:
        The dict written to the record.

    Raises:
        UserError: for a directory that is not a finished run, another backend, or bad
            arguments.
    """
    run, out = Path(run).expanduser(), Path(out).expanduser()
    if keras.backend.backend() != "tensorflow":
        raise UserError(f"LiteRT export needs the TensorFlow backend (this is "
                        f"{keras.backend.backend()}). Run it with --backend tensorflow.",
                        field="backend")
    if dtype not in DTYPES:
        raise UserError(f"Unknown export dtype {dtype!r}. Use one of: {', '.join(DTYPES)}.",
                        field="dtype")
    if out.suffix != ".tflite":
        raise UserError(f"The LiteRT file must end in .tflite. Received: {out}", field="out")
    run = open_run(run, log=log)
    config, policy = run.config, run.policy
    val = data.val_dataset(run.cache(), config.seq_len, 1, windows)
    inputs = np.stack([val[i][0]["token_ids"][0] for i in range(len(val))])
    targets = np.stack([val[i][1][0] for i in range(len(val))])

    def keras_logits(model):
        return np.concatenate([
            keras.ops.convert_to_numpy(model.predict_on_batch(
                {"token_ids": x[None], "padding_mask": np.ones_like(x[None])})).astype(
                np.float32) for x in inputs])

    result = {"run": str(run.dir), "policy": policy, "float8": run.float8, "dtype": dtype,
              "windows": len(inputs)}
    if policy != "float32" or run.float8:  # the model as it trained
        result["keras_policy_val_loss"] = mean_loss(
            keras_logits(run.model(preprocessor=False)), targets)
    model = run.model("float32", float8=False, preprocessor=False)  # what the file stores
    reference = keras_logits(model)
    calibration = np.concatenate([
        data.window_batch(run.cache().train, config.seq_len, config.batch_size, config.seed, i)[0]
        for i in range(-(-calibration_windows // config.batch_size))])[:calibration_windows]
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"export: converting to {out} ({dtype})")
    result["size_bytes"] = convert(model, out, config.seq_len, dtype, calibration)
    runner = interpreter(out)
    logits = run_file(runner, inputs)
    result.update(interpreter=type(runner).__module__.split(".")[0],
        max_abs_logit_diff=float(np.abs(logits - reference).max()),
        keras_val_loss=mean_loss(reference, targets), litert_val_loss=mean_loss(logits, targets))
    result["litert_perplexity"] = math.exp(result["litert_val_loss"])
    write_bytes_atomic(record_path(out), json.dumps(result, indent=2).encode())
    return result


def main(argv) -> int:
    """`kmp export`: parses `argv` (the arguments after the command) and runs it."""
    parser = argparse.ArgumentParser(
        prog="kmp export", description="Export a finished `kmp pretrain` run to a LiteRT "
        "(TFLite) file for devices (TensorFlow backend), run the file in the LiteRT "
        "interpreter on validation windows and write its record beside it "
        "(NAME.export.json): size, largest logit difference against Keras, validation loss "
        "in Keras and in LiteRT.")
    parser.add_argument("--run", required=True, metavar="DIR", help="the run's --out directory")
    parser.add_argument("--format", default="litert", choices=["litert"],
                        help="the file format (litert, formerly TFLite)")
    parser.add_argument("--dtype", default="float32",
                        help="float32, float16, int8 (activations too, calibrated on the run's "
                        "training tokens) or int8-dynamic (weights only) (default float32)")
    parser.add_argument("--out", required=True, metavar="FILE.tflite", help="the file to write")
    parser.add_argument("--windows", type=int, default=16,
                        help="validation windows to compare on (default 16)")
    opts = parser.parse_args(argv)
    if opts.windows < 1:
        raise UserError(f"windows must be >= 1. Received: {opts.windows}", field="windows")
    r = export_run(opts.run, opts.out, opts.dtype, opts.windows)
    print(f"{opts.out}: {r['size_bytes'] / 1e6:.2f} MB ({r['dtype']}); over {r['windows']} "
          f"validation windows: loss {r['litert_val_loss']:.4f} in LiteRT, "
          f"{r['keras_val_loss']:.4f} in Keras; largest logit difference "
          f"{r['max_abs_logit_diff']:.3g}")
    print(f"written: {opts.out}, {record_path(opts.out)}")
    return 0
