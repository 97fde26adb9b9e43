"""The precision trial (`kmp.tuning`) for your own Keras model: `tune(model_fn, data)`, what
`kmp.set_policy("auto", measure=model_fn, data=(x, y))` runs.

Each candidate builds the model afresh from `model_fn` under its dtype policy and from the same
seed, compiled again by `kmp.compile` with its XLA setting and attention kernel (your optimizer
and loss), and trains on the one batch `data`. The choice is cached per model (its layers,
weight shapes, batch shapes, loss and optimizer), backend, device and candidate set.
"""

from __future__ import annotations

import hashlib
import json
import time

from kmp.errors import UserError
from kmp.policy import global_policy
from kmp.tuning import Candidate, Tuning, measure


def _built(model_fn, policy: str):
    """`model_fn()` called under `policy` from seed 0 (every candidate's initial weights)."""
    import keras

    with global_policy(policy):
        keras.utils.set_random_seed(0)
        model = model_fn()
    missing = ("not compiled" if getattr(model, "optimizer", None) is None else
               "without a loss" if getattr(model, "loss", None) is None else "")
    if missing:
        raise UserError(f"The model function must return a keras.Model compiled with an "
                        f"optimizer and a loss (call model.compile(optimizer, loss) in it). "
                        f"It returned: {type(model).__name__}, {missing}.")
    return model


def _compiled(model_fn, cand: Candidate):
    """The model for `cand`: built under its policy, compiled again by `kmp.compile` with its
    XLA setting and attention kernel, the model's own optimizer and loss."""
    from kmp.training import compile as kmp_compile

    model = _built(model_fn, cand.policy)
    kmp_compile(model, model.optimizer, model.loss, weighted_metrics=[], jit_compile=cand.jit,
                islands=cand.attention)
    return model


def _describe(model, data) -> str:
    """What a tuning of `model` on `data` holds for: its class, size, batch shape, and a
    digest of its layers, weight shapes, batch shapes, loss and optimizer (not its name,
    which Keras numbers anew at every build)."""
    import keras

    from kmp._keras import flatten_layers

    loss, shapes = model.loss, [list(getattr(a, "shape", ())) for a in keras.tree.flatten(data)]
    parts = [[type(layer).__name__ for layer in flatten_layers(model, True)],
             [list(w.shape) for w in model.weights], shapes,
             getattr(loss, "name", None) or getattr(loss, "__name__", None) or str(loss),
             type(model.optimizer).__name__]
    digest = hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:12]
    size = f"{model.count_params():,} parameters" if model.built else "not built"
    return f"{type(model).__name__}: {size}, batch {shapes[0]}, {digest}"


def tune(model_fn, data, policies=None, chunk: int = 2, repeats: int = 3, warmup: int = 1,
         use_cache: bool = True, hardware=None, timer=time.perf_counter,
         log=print) -> Tuning:
    """Chooses the policy, XLA setting and attention kernel for your own Keras model by
    training it a few steps under each (the module docstring says how), or returns the
    cached choice for this model, batch, machine and backend.

    Args:
        model_fn: callable. Called with no arguments, under each candidate's dtype policy
            and from the same seed, returns your model compiled as for fit
            (`model.compile(optimizer, loss)` in it, a new optimizer each call). Each
            candidate compiles it again with `kmp.compile` (its XLA setting and attention
            kernel; your optimizer and loss; metrics left out).
        data: tuple. `(x, y)` or `(x, y, sample_weight)`: one batch of the shape you train
            with (the speed depends on it); every step trains on it.
        policies: sequence of str or None. Policies to try; float32, the reference, must be
            one. Defaults to None: all three, less those the hardware rules make pointless.
        chunk: int. Steps per timed turn at least; up to 4x more where the fastest
            candidate's `warmup` steps say a turn would be shorter than `TURN_SECONDS`.
            Defaults to 2.
        repeats: int. Rounds at most. Defaults to 3.
        warmup: int. Untimed steps per candidate once all are compiled (a model's first
            steps after other models ran are slow). Defaults to 1.
        use_cache: bool. Return a cached tuning when there is one. Defaults to True.
        hardware: Hardware or None. For the rules and the cache key. Defaults to
            `kmp.hardware.detect()`.
        timer: callable. The clock of the timed turns. Defaults to `time.perf_counter`.
        log: callable. Progress lines, then the table. Defaults to print.

    Returns:
        A `Tuning` (also kept in `kmp.decisions`' cache).

    Raises:
        UserError: for data that is not (x, y), a model_fn that does not return a compiled
            model, policies without float32, or when no candidate trains correctly.

    Example:
    >>> import os, tempfile, keras, numpy as np
    >>> os.environ["KMP_CACHE_DIR"] = tempfile.mkdtemp()
    >>> def build():
    ...     model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, "relu"),
    ...                               keras.layers.Dense(1)])
    ...     model.compile(keras.optimizers.SGD(0.01), "mse")
    ...     return model
    >>> x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    >>> tuning = tune(build, (x, x.sum(1)), ["float32"], chunk=1, repeats=1, log=len)
    >>> tuning.policy, tuning.attention
    ('float32', None)
    >>> del os.environ["KMP_CACHE_DIR"]
    """
    import keras

    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        raise UserError(f"data= takes (x, y) or (x, y, sample_weight): one batch to train the "
                        f"model on. Received: {type(data).__name__}"
                        f"{f' of {len(data)}' if isinstance(data, (tuple, list)) else ''}.")
    model = _describe(_built(model_fn, "float32"), data)
    per_step = (len(keras.tree.flatten(data[0])[0]), "samples")
    return measure(model, lambda c: _compiled(model_fn, c), lambda step: tuple(data),
                   per_step, policies, chunk, repeats, warmup, use_cache, hardware, timer, log)
