"""`kmp.compile`: the one call that prepares a model for fit according to the precision plan."""

from __future__ import annotations

import keras

from kmp._keras import flatten_layers, tracking_unlocked
from kmp.callbacks import ScalerMetrics
from kmp.errors import UserError
from kmp.layers import harden
from kmp.policy import POLICIES
from kmp.policy import plan as make_plan
from kmp.scaling import LossScaleOptimizer


def _computes_in_float16(model) -> bool:
    return any(layer.compute_dtype == "float16" for layer in flatten_layers(model, True))


def _scaler(optimizer, loss_scale: dict | None) -> LossScaleOptimizer:
    """kmp's LossScaleOptimizer around `optimizer`; a Keras LossScaleOptimizer's initial scale
    and growth steps carry over (`loss_scale` overrides them)."""
    settings, given = {}, dict(loss_scale or {})
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
    model's policy, puts FP32 islands in (`kmp.harden`), and adds the loss scale, skipped steps,
    consecutive skips and gradient norm to fit's logs. Pass `kmp.callbacks.PrecisionMonitor()`
    to fit to record overflow events and enforce the skip budget.

    Args:
        model: keras.Model. The model to compile.
        optimizer: str or keras.optimizers.Optimizer. Defaults to "adam".
        loss: loss for `model.compile`. Defaults to None.
        metrics: metrics for `model.compile`. Defaults to None.
        jit_compile: bool or None. None takes the plan's recommendation for the model's policy
            on this hardware. Defaults to None.
        islands: bool. Apply `kmp.harden(model)`. Defaults to True.
        float32_residual: bool. Passed to `kmp.harden`. Defaults to False.
        loss_scale: dict or None. Keyword arguments for `kmp.LossScaleOptimizer` (e.g.
            `{"hysteresis": 2}`). Defaults to None.
        **compile_kwargs: Anything else `keras.Model.compile` takes.

    Returns:
        The optimizer the model was compiled with.

    Example:
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> opt = compile(m, "sgd", "mse")
    >>> type(opt).__name__
    'SGD'
    """
    optimizer = keras.optimizers.get(optimizer)
    if islands or float32_residual:
        harden(model, float32_residual=float32_residual)
    needs_scaling = _computes_in_float16(model)
    if needs_scaling and not isinstance(optimizer, LossScaleOptimizer):
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
    if isinstance(optimizer, LossScaleOptimizer):
        with tracking_unlocked(model):
            model._kmp_scaler_metrics = ScalerMetrics(optimizer)
    return optimizer
