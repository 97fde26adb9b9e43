"""A finished `kmp pretrain` run, read from its directory and rebuilt exactly as it trained.

A run's --out directory holds config.json (its `GPTConfig`), metrics.json (the policy it
trained under), model.keras (its final weights) and checkpoints/latest.json, whose
"recovery" record says what a recovery changed: the policy, a float32 residual stream, and
the data windows it skipped. Everything that loads a trained run (quantize, finetune --qat,
export, the diagnoses) goes through `open_run`, so each rebuilds the same computation: the
policy (a recovery's included), the float32 residual stream, float8 matmuls when the run
trained in float8, and the tokenizer for `generate`.

Example:
    ```python
    run = open_run("runs/tiny")
    model = run.model()  # as trained, tokenizer attached
    print(model.generate("def", max_length=32))
    ```
"""

from __future__ import annotations

import contextlib
import json
import warnings
import zipfile
from pathlib import Path

import keras

import kmp
from kmp._keras import replace_sublayer
from kmp.checkpoint import LATEST
from kmp.errors import UserError
from kmp.gpt import data
from kmp.gpt.config import GPTConfig, from_json
from kmp.gpt.model import build_model, use_float8
from kmp.recovery import position


def attach_preprocessor(model, tokenizer, seq_len: int):
    """Attaches keras-hub's GPT-2 preprocessor for `tokenizer` to a kmp GPT, in place.

    With it, `model.generate("def")` takes and returns text, and a `.keras` file saved from
    the model carries the tokenizer (its vocabulary and merges), so
    `keras.saving.load_model(path).generate("def")` works. A model with a preprocessor feeds
    text, not token ids, to keras-hub's `fit`/`evaluate`/`predict`: to train or evaluate on
    token windows, use a model without one (`FinishedRun.model(preprocessor=False)`,
    `kmp.gpt.load_model(path, preprocessor=False)`).

    Args:
        model: a `kmp.gpt.GPTCausalLM` (keras-hub GPT2CausalLM).
        tokenizer: the run's `keras_hub.tokenizers.GPT2Tokenizer` (`FinishedRun.tokenizer()`,
            or `TokenCache.tokenizer()`).
        seq_len: int. The longest text `generate` makes, in tokens (at most the model's
            maximum sequence length).

    Returns:
        The same model, for chaining.

    Example:
        ```python
        run = open_run("runs/tiny")
        model = attach_preprocessor(kmp.gpt.load_model("runs/tiny/model.keras"),
                                    run.tokenizer(), run.config.seq_len)
        model.save("gpt.keras")  # keras.saving.load_model("gpt.keras").generate("def")
        ```
    """
    import keras_hub

    replace_sublayer(model, "preprocessor", keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=seq_len))
    if getattr(model, "sampler", None) is None:  # keras-hub sets both in compile()
        model.sampler = keras_hub.samplers.get("top_k")
    model.generate_function = None  # rebuilt for the preprocessor
    return model


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {str(e)[:80]}); it is not "
                        f"{what}. Restore it from the run's backup, or rerun kmp pretrain.",
                        field="run") from None


def read_config(path, log=print) -> GPTConfig:
    """The `GPTConfig` saved as a run's config.json: unknown fields (from another kmp version)
    are left out with one warning naming them; missing fields take their defaults.

    Args:
        path: str or Path. The config.json file.
        log: callable. Where the warning goes. Defaults to print.

    Returns:
        The run's GPTConfig, validated.

    Raises:
        UserError: when the file is not a JSON object of valid config fields.
    """
    path = Path(path)
    saved = _read_json(path, "a kmp GPT config")
    if not isinstance(saved, dict):
        raise UserError(f"{path} is damaged: it holds a JSON {type(saved).__name__}, not a "
                        "kmp GPT config. Restore it, or rerun kmp pretrain.", field="run")
    try:
        return from_json(saved, log=lambda line: log(f"{line} ({path})"))
    except UserError as e:
        raise UserError(f"{path} holds an invalid config: {e}", field="run") from None


class FinishedRun:
    """A `kmp pretrain` --out directory, read: what it trained and how (use `open_run`).

    Attributes:
        dir: Path. The run's directory.
        config: GPTConfig. Its config.json.
        policy: str. The policy it trained under (a recovery's change included).
        float8: bool. Whether its dense layers trained in float8.
        float32_residual: bool. Whether it trained with a float32 residual stream (a
            recovery's last rung).
        steps_read: int. The first data position (in batches of the training stream) the run
            never trained on; the windows a recovery skipped count as read.
        weights: Path. The file its final weights are in (model.keras, or the newest
            checkpoint when there is none).
        record: dict or None. Its newest checkpoint record (checkpoints/latest.json).
    """

    def __init__(self, directory, config: GPTConfig, policy: str, weights: Path,
                 record: dict | None, log=print):
        self.dir, self.config, self.policy = Path(directory), config, policy
        self.weights, self.record, self._log = Path(weights), record, log
        recovery = (record or {}).get("extra", {}).get("recovery") or {}
        self.float8 = bool(config.float8)
        self.float32_residual = bool(recovery.get("float32_residual", False))
        self.skip = [tuple(w) for w in recovery.get("skip", [])]
        self.steps_read = self._position(record or {})
        self._cache = None

    def _position(self, record: dict) -> int:
        """The data position after the run's last batch: the checkpoint's own record of it,
        else counted from its batches (older records: epochs; none: the config's steps)."""
        if record.get("position") is not None:
            return int(record["position"])
        config = self.config
        if record.get("batches") is not None:
            batches = int(record["batches"])
        elif record.get("epoch") is not None:  # kmp <= 0.1.0's records: epochs
            batches = int(record["epoch"]) * config.intervals()[0] * config.grad_accum
        else:
            batches = config.steps * config.grad_accum
        return position(batches, self.skip)

    def __repr__(self):
        return (f"FinishedRun({str(self.dir)!r}, policy={self.policy!r}, float8={self.float8}, "
                f"float32_residual={self.float32_residual}, steps_read={self.steps_read})")

    def cache(self):
        """The run's token cache (`kmp.gpt.data.TokenCache`), built once if it is missing."""
        if self._cache is None:
            self._cache = data.build_token_cache(self.config.corpus, self.config.vocab_size,
                                                 self.config.cache_dir, log=self._log)
        return self._cache

    def tokenizer(self):
        """The run's `keras_hub.tokenizers.GPT2Tokenizer`."""
        return self.cache().tokenizer()

    @contextlib.contextmanager
    def preprocessor_attached(self, model):
        """Attaches the run's tokenizer to `model` for the block (to save a `.keras` file that
        generates from text) and gives the model back its own preprocessor after.

        Example:
            ```python
            with run.preprocessor_attached(model):
                model.save("gpt.keras")
            ```
        """
        own = model.preprocessor
        attach_preprocessor(model, self.tokenizer(), self.config.seq_len)
        try:
            yield model
        finally:
            replace_sublayer(model, "preprocessor", own)

    def model(self, policy: str | None = None, *, float8: bool | None = None,
              islands: bool = True, preprocessor: bool = True, weights=None):
        """The run's model, rebuilt as it trained, its weights loaded.

        The global dtype policy is left as it was.

        Args:
            policy: str or None. The policy to build under. Defaults to the run's own.
            float8: bool or None. Float8 dense layers (Keras's "float8" quantization layout).
                False gives the float weights alone, a model Keras can quantize to int8 or
                int4. Defaults to None: as the run trained.
            islands: bool. Put in the FP32 islands (`kmp.harden`), as training did. False
                leaves them out: Keras cannot quantize a model holding unbuilt layers, so
                quantize first and harden after. Defaults to True.
            preprocessor: bool. Attach the tokenizer (`attach_preprocessor`) so `generate`
                takes text; False for `fit`/`evaluate`/`predict` on token windows. Defaults
                to True.
            weights: str, Path or None. A weights file of this run's model (e.g. after
                fine-tuning) in the layout asked for. Defaults to the run's own.

        Returns:
            A `kmp.gpt.GPTCausalLM`.
        """
        float8 = self.float8 if float8 is None else bool(float8)
        before = keras.config.dtype_policy()
        try:
            kmp.set_policy(policy or self.policy)
            model = build_model(self.config, float32_residual=self.float32_residual)
            if float8:
                use_float8(model)
            if weights is not None:
                _load(model, weights)
            elif float8 or not self.float8:
                _load(model, self.weights)
            else:  # the float weights of a float8 run: its float8 layout, without the scales
                trained = build_model(self.config, float32_residual=self.float32_residual)
                use_float8(trained)
                _load(trained, self.weights)
                found = {v.path: v for v in trained.weights}
                for variable in model.weights:
                    variable.assign(found[variable.path])
        finally:
            keras.config.set_dtype_policy(before)
        if islands:
            kmp.harden(model)
        if preprocessor:
            attach_preprocessor(model, self.tokenizer(), self.config.seq_len)
        return model


def _load(model, path):
    """`model.load_weights(path)`, a file that does not fit the model a UserError."""
    try:
        with warnings.catch_warnings():  # a checkpoint's optimizer, not needed here
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(path)
    except (ValueError, OSError, zipfile.BadZipFile) as e:  # variables that do not match,
        # a file that is not HDF5 or not a .keras zip
        raise UserError(f"{path} does not hold this run's weights ({str(e)[:100]}). Pass the "
                        "run's own directory, with the config.json it trained with.",
                        field="run") from e


def open_run(path, log=print) -> FinishedRun:
    """Reads a `kmp pretrain` --out directory: its config, policy, weights and recoveries.

    Args:
        path: str or Path. The run's directory.
        log: callable. Where warnings (unknown config fields) and progress lines go.
            Defaults to print.

    Returns:
        A `FinishedRun`.

    Raises:
        UserError: when `path` is not a directory, has no config.json or a damaged one, or
            holds no weights (neither model.keras nor a checkpoint).

    Example:
    >>> import tempfile
    >>> try:
    ...     open_run(tempfile.mkdtemp())
    ... except UserError as e:
    ...     print("no config.json" in str(e))
    True
    """
    run = Path(path).expanduser()
    if not run.is_dir():
        raise UserError(f"{run} is not a directory, so not a kmp pretrain run. Pass a run's "
                        "--out directory.", field="run")
    if not (run / "config.json").is_file():
        raise UserError(f"{run} is not a finished kmp pretrain run (no config.json). Pass a "
                        "run's --out directory.", field="run")
    config = read_config(run / "config.json", log=log)
    ckpt = run / "checkpoints"
    record = _read_json(ckpt / LATEST, "a kmp checkpoint record") if (
        ckpt / LATEST).is_file() else None
    if record is not None and not isinstance(record, dict):
        record = None
    weights = run / "model.keras"
    if not weights.is_file() and record is not None and record.get("weights"):
        weights = ckpt / record["weights"]
    if not weights.is_file():
        raise UserError(f"{run} is not a finished kmp pretrain run (no weights: neither "
                        "model.keras nor a checkpoint). Pass a run's --out directory, or "
                        "resume the run to its end.", field="run")
    metrics = _read_json(run / "metrics.json", "a kmp metrics record") if (
        run / "metrics.json").is_file() else {}
    recovery = (record or {}).get("extra", {}).get("recovery") or {}
    policy = (metrics.get("policy") if isinstance(metrics, dict) else None) or recovery.get(
        "policy") or ((record or {}).get("precision") or {}).get("policy")
    if not policy:
        from kmp.policy import plan

        policy = plan(config.precision).policy
    return FinishedRun(run, config, policy, weights, record, log=log)
