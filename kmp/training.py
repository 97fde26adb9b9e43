"""`kmp.compile`: the one call that prepares a model for fit according to the precision plan."""

from __future__ import annotations

import keras

from kmp._keras import flatten_layers, replace_loss_tracker, tracking_unlocked
from kmp.callbacks import LossTracker, ScalerMetrics
from kmp.errors import UserError
from kmp.layers import harden
from kmp.policy import POLICIES
from kmp.policy import plan as make_plan
from kmp.scaling import LossScaleOptimizer


def _computes_in_float16(model) -> bool:
    return any(layer.compute_dtype == "float16" for layer in flatten_layers(model, True))


def _scaler(optimizer, loss_scale: dict | None) -> LossScaleOptimizer:
    """kmp's LossScaleOptimizer for `optimizer` with the `loss_scale` settings: kmp's own is
    kept and given them (`LossScaleOptimizer.update_settings`); a Keras LossScaleOptimizer's
    initial scale and growth steps carry over (`loss_scale` overrides them)."""
    given = dict(loss_scale or {})
    if isinstance(optimizer, LossScaleOptimizer):
        return optimizer.update_settings(**given)
    settings = {}
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        settings = {"initial_scale": optimizer.initial_scale,
                    "growth_interval": optimizer.dynamic_growth_steps}
        optimizer = optimizer.inner_optimizer
    if "dynamic_growth_steps" in given and "growth_interval" not in given:
        given["growth_interval"] = given.pop("dynamic_growth_steps")
    return LossScaleOptimizer(optimizer, **{**settings, **given})


def compile(  # noqa: A001 - mirrors keras.Model.compile on purpose
    model,
    optimizer="adam",
    loss=None,
    metrics=None,
    *,
    jit_compile=None,
    islands=True,
    float32_residual=False,
    loss_scale=None,
    **compile_kwargs,
):
    """Compiles `model` for mixed-precision training according to the precision plan.

    Wraps the optimizer in `kmp.LossScaleOptimizer` exactly when some layer computes in
    float16 (a mixed_float16 or float16 policy, or a DTypePolicyMap that has one: keras'
    own compile wraps only for a global mixed_float16; a Keras LossScaleOptimizer given here
    keeps its initial scale and growth steps), picks `jit_compile` from the plan for the
    model's policy, puts FP32 islands in (`kmp.harden`), and adds to fit's logs each step's own
    loss (`batch_loss`, beside Keras's running mean `loss`: `kmp.callbacks.LossTracker`) and,
    with loss scaling, the loss scale, skipped steps, consecutive skips and gradient norm (so
    `evaluate` returns a list, or a dict with `return_dict=True`). Pass
    `kmp.callbacks.PrecisionMonitor()` to fit to record overflow events and enforce the skip
    budget.

    Args:
        model: keras.Model. The model to compile.
        optimizer: str or keras.optimizers.Optimizer. Defaults to "adam".
        loss: loss for `model.compile`. Defaults to None.
        metrics: metrics for `model.compile`. Defaults to None.
        jit_compile: bool or None. None takes the plan's recommendation for the model's policy
            on this hardware. Defaults to None.
        islands: bool or str. The attention kernel, as `kmp.harden`'s `attention`: "island"
            (or True) puts the float32 attention islands in, "fused" (or False) keeps or
            restores Keras's own kernel, "auto" decides by a cached measurement on this
            machine (`kmp.decisions`). Defaults to True.
        float32_residual: bool. Make a keras-hub GPT-2 style backbone's residual stream
            float32 (`kmp.harden(float32_residual=True)`), with or without `islands`.
            Defaults to False.
        loss_scale: dict or None. Settings for `kmp.LossScaleOptimizer` (e.g.
            `{"hysteresis": 2}`): for the one kmp.compile creates, or applied to a
            kmp.LossScaleOptimizer given as `optimizer` before its first step
            (`update_settings`). Defaults to None.
        **compile_kwargs: Anything else `keras.Model.compile` takes.

    Returns:
        The optimizer the model was compiled with.

    Raises:
        UserError: if `loss_scale` is given but no layer computes in float16, names an unknown
            or invalid setting, or would change a kmp.LossScaleOptimizer that has already
            been built.

    Example:
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> opt = compile(m, "sgd", "mse")
    >>> type(opt).__name__
    'SGD'
    """
    optimizer = keras.optimizers.get(optimizer)
    if islands or float32_residual:
        harden(model, float32_residual=float32_residual, attention=islands)
    needs_scaling = _computes_in_float16(model)
    if needs_scaling:
        optimizer = _scaler(optimizer, loss_scale)
    elif loss_scale and not needs_scaling:
        raise UserError(
            f"kmp.compile: loss_scale={loss_scale!r} was given but no layer computes in float16, "
            "so there is no loss scaling to configure. Drop loss_scale or use mixed_float16."
        )
    if jit_compile is None:
        name = model.dtype_policy.name
        jit_compile = make_plan(name if name in POLICIES else "auto").jit_compile
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=jit_compile,
                  **compile_kwargs)
    replace_loss_tracker(model, LossTracker())  # each step's own loss as `batch_loss`
    if isinstance(optimizer, LossScaleOptimizer):
        with tracking_unlocked(model):
            model._kmp_scaler_metrics = ScalerMetrics(optimizer)
    return optimizer
