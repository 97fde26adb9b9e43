"""A LossScaleOptimizer with bounds, hysteresis, cross-replica skips and overflow attribution."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from kmp import backends
from kmp._keras import (
    no_automatic_dependency_tracking,
    optimizer_built_for,
    optimizer_own_variables,
    optimizer_variable_index,
    overwrites_with_gradient,
)
from kmp.errors import TrainingStopped, UserError

# The scaler state as `state()` and fit's logs name it -> the optimizer variable holding it.
STATE_VARIABLES = {
    "loss_scale": "dynamic_scale",
    "step_counter": "step_counter",
    "hysteresis_left": "hysteresis_left",
    "skipped_steps": "skipped_steps",
    "consecutive_skips": "consecutive_skips",
    "grad_norm": "grad_norm",
}


class NonFiniteGradientsError(TrainingStopped):
    """Raised when more consecutive steps than allowed had non-finite gradients."""


def _check(name, value, ok, need):
    if not ok:
        raise UserError(f"LossScaleOptimizer: {name} must be {need}. Received: {name}={value!r}")


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# The scaling settings, as the constructor, `update_settings` and the config name them.
SETTINGS = ("initial_scale", "growth_interval", "growth_factor", "backoff_factor", "hysteresis",
            "min_scale", "max_scale", "max_consecutive_skips")


def _one_growth_interval(growth_interval, dynamic_growth_steps):
    """kmp's and Keras's names for one setting: the value given, or None."""
    if None not in (growth_interval, dynamic_growth_steps) and (
            dynamic_growth_steps != growth_interval):
        raise UserError(
            "LossScaleOptimizer: growth_interval and dynamic_growth_steps are the same "
            f"setting and were given different values. Received: growth_interval="
            f"{growth_interval!r}, dynamic_growth_steps={dynamic_growth_steps!r}. Pass one of "
            "them.")
    return growth_interval if growth_interval is not None else dynamic_growth_steps


def _validated(initial_scale, growth_interval, growth_factor, backoff_factor, hysteresis,
               min_scale, max_scale, max_consecutive_skips) -> dict:
    """The settings checked together and as the types kept: raises UserError on the first bad
    one, saying what was received."""
    num = (int, float, np.integer, np.floating)
    _check("min_scale", min_scale, isinstance(min_scale, num) and 0 < min_scale < math.inf,
           "a finite number > 0")
    _check("max_scale", max_scale,
           isinstance(max_scale, num) and min_scale <= max_scale < math.inf,
           f"finite and >= min_scale ({min_scale})")
    _check("initial_scale", initial_scale,
           isinstance(initial_scale, num) and min_scale <= initial_scale <= max_scale,
           f"within [min_scale, max_scale] = [{min_scale}, {max_scale}]")
    _check("growth_interval", growth_interval,
           _is_int(growth_interval) and growth_interval >= 1, "an int >= 1")
    _check("growth_factor", growth_factor,
           isinstance(growth_factor, num) and 1 < growth_factor < math.inf, "a number > 1")
    _check("backoff_factor", backoff_factor,
           isinstance(backoff_factor, num) and 0 < backoff_factor < 1, "in (0, 1)")
    _check("hysteresis", hysteresis, _is_int(hysteresis) and hysteresis >= 1, "an int >= 1")
    _check("max_consecutive_skips", max_consecutive_skips,
           max_consecutive_skips is None
           or (_is_int(max_consecutive_skips) and max_consecutive_skips >= 1),
           "None or an int >= 1")
    return {"initial_scale": float(initial_scale), "growth_interval": int(growth_interval),
            "growth_factor": float(growth_factor), "backoff_factor": float(backoff_factor),
            "hysteresis": int(hysteresis), "min_scale": float(min_scale),
            "max_scale": float(max_scale), "max_consecutive_skips": max_consecutive_skips}


@keras.saving.register_keras_serializable(package="kmp")
class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Dynamic loss scaling that cannot collapse, with hysteresis and overflow attribution.

    A subclass of `keras.optimizers.LossScaleOptimizer`, so `model.compile` does not wrap it
    again, and a drop-in for it: Keras's `dynamic_growth_steps` is accepted as the same thing
    as `growth_interval`. It runs on every Keras backend: `apply` on TensorFlow and torch,
    `stateless_apply` (the same rule, as a pure function) in JAX's `fit`. Each step it checks
    the gradients for inf/NaN (across all replicas, before any update); a step with a
    non-finite gradient is skipped: no weight, slot or iteration changes.

    Update rule (with `hysteresis=1` the same scale sequence as `torch.amp.GradScaler`):
    after `growth_interval` consecutive finite steps the scale is multiplied by `growth_factor`;
    on a non-finite step it is multiplied by `backoff_factor`. With `hysteresis=N > 1` it follows
    DeepSpeed's `DynamicLossScaler` without consecutive hysteresis: the scale backs off only once
    N overflows have used up the budget, and the budget is restored when the scale next grows.
    The scale is always clipped to `[min_scale, max_scale]`.

    State kept as optimizer variables (so checkpoints carry it): `dynamic_scale`,
    `step_counter` (finite steps since the last growth or overflow), `hysteresis_left`,
    `skipped_steps`, `consecutive_skips`, `grad_norm` (global norm of the last applied, unscaled
    gradients on this replica) and `nonfinite_counts` (per trainable variable, the number of
    replicas whose gradient was non-finite on the last skipped step). Each step also leaves
    that state as tensors of the step for `take_step_state()`, through which
    `kmp.callbacks.ScalerMetrics` puts it into fit's logs.

    Args:
        inner_optimizer: keras.optimizers.Optimizer. The optimizer that applies the updates; its
            clipping, weight decay and gradient accumulation see unscaled gradients.
        initial_scale: float. Starting loss scale. Defaults to 2**15.
        growth_interval: int or None. Consecutive finite steps before the scale grows; Keras's
            name for it, `dynamic_growth_steps`, is accepted too. Defaults to None: 2000.
        growth_factor: float. Multiplier on growth, > 1. Defaults to 2.0.
        backoff_factor: float. Multiplier on overflow, in (0, 1). Defaults to 0.5.
        hysteresis: int. Overflows tolerated before backing off (DeepSpeed's `delayed_shift`).
            Defaults to 1 (back off on every overflow).
        min_scale: float. Lower bound of the scale, > 0. Defaults to 1.0.
        max_scale: float. Upper bound of the scale, finite. Defaults to 2**24.
        max_consecutive_skips: int or None. After this many consecutive skipped steps training
            stops with `NonFiniteGradientsError` naming the variables whose gradients were
            non-finite. Checked after each eager `apply`, and inside `fit` by
            `kmp.callbacks.PrecisionMonitor` (which `kmp.compile`'s users pass to fit).
            None disables the budget. Defaults to 100.
        name: str or None. Defaults to None.

    Example:
    >>> opt = LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=1024.0)
    >>> opt.initial_scale
    1024.0
    """

    def __init__(
        self,
        inner_optimizer,
        initial_scale=2.0**15,
        growth_interval=None,
        growth_factor=2.0,
        backoff_factor=0.5,
        hysteresis=1,
        min_scale=1.0,
        max_scale=2.0**24,
        max_consecutive_skips=100,
        name=None,
        **kwargs,
    ):
        growth_interval = _one_growth_interval(growth_interval,
                                               kwargs.pop("dynamic_growth_steps", None))
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise UserError(
                "LossScaleOptimizer: inner_optimizer must be a keras.optimizers.Optimizer. "
                f"Received: {inner_optimizer!r}"
            )
        if isinstance(inner_optimizer, keras.optimizers.LossScaleOptimizer):
            raise UserError(
                "LossScaleOptimizer: inner_optimizer is already a LossScaleOptimizer; pass its "
                f"inner_optimizer instead. Received: {inner_optimizer!r}"
            )
        settings = _validated(initial_scale=initial_scale,
                              growth_interval=2000 if growth_interval is None else growth_interval,
                              growth_factor=growth_factor, backoff_factor=backoff_factor,
                              hysteresis=hysteresis, min_scale=min_scale, max_scale=max_scale,
                              max_consecutive_skips=max_consecutive_skips)
        super().__init__(
            inner_optimizer,
            initial_scale=settings.pop("initial_scale"),
            dynamic_growth_steps=settings.pop("growth_interval"),
            name=name,
            **kwargs,
        )
        for key, value in settings.items():
            setattr(self, key, value)

    def update_settings(self, **settings):
        """Changes scaling settings of an optimizer that has not taken a step yet.

        Takes the constructor's settings by name (`initial_scale`, `growth_interval` or
        `dynamic_growth_steps`, `growth_factor`, `backoff_factor`, `hysteresis`, `min_scale`,
        `max_scale`, `max_consecutive_skips`), checks them together with the others as the
        constructor does, and sets them on this object. `kmp.compile(loss_scale=...)` calls it
        when given a kmp.LossScaleOptimizer.

        Args:
            **settings: The settings to change.

        Returns:
            This optimizer.

        Raises:
            UserError: for an unknown or invalid setting, or a changed setting on an optimizer
                that is already built (its scale and counters exist and compiled steps may
                hold the old values): set it when creating the optimizer instead.

        Example:
        >>> opt = LossScaleOptimizer(keras.optimizers.SGD()).update_settings(hysteresis=2)
        >>> opt.hysteresis
        2
        """
        settings = dict(settings)
        if "dynamic_growth_steps" in settings:
            settings["growth_interval"] = _one_growth_interval(
                settings.get("growth_interval"), settings.pop("dynamic_growth_steps"))
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise UserError(
                f"LossScaleOptimizer: unknown setting {unknown[0]!r}. Received: "
                f"{unknown[0]}={settings[unknown[0]]!r}. Use one of: {', '.join(SETTINGS)}.")
        current = {key: getattr(self, key) for key in SETTINGS}
        changed = {k: v for k, v in settings.items() if v != current[k]}
        if changed and self.built:
            key = next(iter(changed))
            raise UserError(
                f"LossScaleOptimizer: {key} cannot change once the optimizer is built (it holds "
                f"a scale and counters). Received: {key}={changed[key]!r}, the optimizer has "
                f"{key}={current[key]!r}. Set it when creating the optimizer, or use a new one.")
        for key, value in _validated(**{**current, **changed}).items():
            setattr(self, key, value)
        return self

    @property
    def growth_interval(self) -> int:
        """Consecutive finite steps before the scale grows: Keras's `dynamic_growth_steps`
        under kmp's (and torch's) name; the two are one setting."""
        return self.dynamic_growth_steps

    @growth_interval.setter
    def growth_interval(self, value):
        _check("growth_interval", value, _is_int(value) and value >= 1, "an int >= 1")
        self.dynamic_growth_steps = int(value)

    @no_automatic_dependency_tracking
    def build(self, var_list):
        # "only_first_replica": every replica computes the same value from all-reduced flags,
        # and such variables may be assigned in replica context as well as cross-replica.
        def var(name, init, dtype="int", shape=()):
            return self.add_variable(
                shape=shape,
                dtype=dtype,
                initializer=keras.initializers.Constant(init),
                aggregation="only_first_replica",
                name=name,
            )

        self.step_counter = var("step_counter", 0)
        self.dynamic_scale = var("dynamic_scale", self.initial_scale, "float32")
        self.hysteresis_left = var("hysteresis_left", self.hysteresis)
        self.skipped_steps = var("skipped_steps", 0)
        self.consecutive_skips = var("consecutive_skips", 0)
        self.grad_norm = var("grad_norm", 0.0, "float32")
        self.nonfinite_counts = var("nonfinite_counts", 0, "int32", (len(var_list),))
        self.inner_optimizer.build(var_list)
        keras.optimizers.Optimizer.build(self, var_list)

    # ----------------------------------------------------------------- the step
    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        """`apply` as a pure function of the values (Keras's JAX trainer calls this): returns
        (new trainable values, new optimizer values); a skipped step returns the weights and
        the inner optimizer's values unchanged. Leaves the step's state for
        `take_step_state`."""
        if not self.built:
            raise ValueError("kmp.LossScaleOptimizer.stateless_apply needs a built optimizer: "
                             "call optimizer.build(trainable_variables) first.")
        weights, state, step_state = self._stateless_step(optimizer_variables, grads,
                                                          trainable_variables)
        self._leave_step_state(step_state)
        return weights, state

    def _stateless_step(self, optimizer_variables, grads, trainable_variables):
        """stateless_apply's work, a pure function: (weights, optimizer values, step state)."""
        own_variables, built_for = optimizer_own_variables(self), optimizer_built_for(self)
        own = len(own_variables)
        own_values, inner_values = list(optimizer_variables[:own]), optimizer_variables[own:]
        grads, trainable_variables = list(grads), list(trainable_variables)
        with keras.StatelessScope(state_mapping=list(zip(own_variables, own_values))) as scope:
            flags = self._nonfinite_flags(grads, built_for)
            finite = ops.equal(ops.sum(flags), 0)
            unscaled = self._unscaled(grads, built_for)

            def step():
                return self.inner_optimizer.stateless_apply(inner_values, unscaled,
                                                            trainable_variables)

            new_weights, new_inner = ops.cond(
                finite, step, lambda: (trainable_variables, list(inner_values)))
            self._update_state(finite, flags, self._local_grad_norm(grads))
            new_own = [scope.get_current_value(v) for v in own_variables]
        new_own = [old if new is None else new for new, old in zip(new_own, own_values)]
        index = {id(v): i for i, v in enumerate(own_variables)}
        step_state = {key: new_own[index[id(getattr(self, name))]]
                      for key, name in STATE_VARIABLES.items()}
        return list(new_weights), new_own + list(new_inner), step_state

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        tvs = list(trainable_variables) if trainable_variables is not None else None
        grads = list(grads)
        flags = self._nonfinite_flags(grads, tvs or optimizer_built_for(self))
        backends.apply_scaled(self, flags, grads, tvs)
        self._leave_step_state({key: getattr(self, name).value
                                for key, name in STATE_VARIABLES.items()})
        # Eagerly, enforce the budget here. Inside a compiled step a host check would cost a sync
        # per step (and XLA has no string ops): `kmp.callbacks.PrecisionMonitor` enforces it
        # from fit's logs instead.
        if not backends.in_compiled_function(flags):
            self.check_skip_budget()

    # The handoff of each step's scaler state to fit's logs, in the open. Writer: `apply` and
    # `stateless_apply`, once per step, inside the traced train step. Reader:
    # `kmp.callbacks.ScalerMetrics.result()`, later in the same traced step (Keras computes the
    # metrics after the optimizer step), which copies the tensors into its own variables. Why
    # not read the variables: on JAX, fit holds the optimizer's values outside the variables
    # until it syncs (at the end of the epoch), so only the step's own tensors are current.
    def _leave_step_state(self, step_state):
        # Kept in __dict__: a tracked attribute would make the step's tensors optimizer state.
        self.__dict__["_step_state"] = step_state

    def take_step_state(self) -> dict | None:
        """Returns the scaler state the last step left, and forgets it; None if no step ran
        since the last call.

        `apply` and `stateless_apply` leave, once per step, the state after that step as
        tensors of the traced train step: a dict with the keys of `state()` (`loss_scale`,
        `step_counter`, `hysteresis_left`, `skipped_steps`, `consecutive_skips`,
        `grad_norm`). `kmp.callbacks.ScalerMetrics`, which `kmp.compile` attaches to the
        model, takes it in the same train step and carries it into fit's logs. The tensors
        belong to the step that made them: use them in that step (a metric's `result`), not
        after it; between steps, read `state()`. On JAX, fit keeps the optimizer's values
        outside its variables until it syncs, so these tensors are the only current copy
        inside a step.

        Returns:
            A dict of scalar tensors, or None.

        Example:
        >>> w = keras.Variable([1.0, 2.0])
        >>> opt = LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=8.0)
        >>> opt.apply([keras.ops.ones(2) * 8.0], [w])
        >>> sorted(opt.take_step_state())[:2], opt.take_step_state()
        (['consecutive_skips', 'grad_norm'], None)
        """
        return self.__dict__.pop("_step_state", None)

    def _assign_stateless(self, grads, tvs):
        """A stateful step as the pure step, compiled once, then assigned (JAX)."""
        order = {id(v): i for i, v in enumerate(tvs)}
        ordered = [grads[order[id(v)]] if id(v) in order else None
                   for v in optimizer_built_for(self)]
        if "_compiled_step" not in self.__dict__:
            self.__dict__["_compiled_step"] = backends.jit(self._stateless_step)
        weights, state, _ = self._compiled_step(
            [v.value for v in self.variables], ordered,
            [v.value for v in optimizer_built_for(self)])
        for v, value in zip(optimizer_built_for(self) + self.variables, weights + state):
            v.assign(value)

    def _nonfinite_flags(self, grads, tvs):
        """int32 vector over the built variables: 1 where that gradient has an inf or NaN."""
        slots = [ops.zeros((), "int32")] * len(optimizer_built_for(self))
        for g, v in zip(grads, tvs):
            if g is not None:
                bad = ops.logical_not(ops.all(ops.isfinite(g)))
                slots[optimizer_variable_index(self, v)] = ops.cast(bad, "int32")
        return ops.stack(slots)

    def _local_grad_norm(self, grads):
        sq = [ops.sum(ops.square(ops.cast(g, "float32"))) for g in grads if g is not None]
        total = ops.sum(ops.stack(sq)) if sq else ops.zeros((), "float32")
        return ops.sqrt(total) / ops.cast(self.dynamic_scale, "float32")

    def _unscaled(self, grads, variables):
        scale = self.dynamic_scale.value
        return [
            g if g is None or overwrites_with_gradient(self, v) else ops.divide(g, scale)
            for g, v in zip(grads, variables)
        ]

    def _apply_finite(self, grads, tvs):
        unscaled = self._unscaled(grads, tvs or optimizer_built_for(self))
        self.inner_optimizer.apply(unscaled, trainable_variables=tvs)

    def _apply_and_update(self, flags, grad_norm, grads, tvs):
        """Applies the step if every flag is 0, then updates the scaler state (one context;
        the flags are this replica's, or already all-reduced across replicas)."""
        finite = ops.equal(ops.sum(flags), 0)
        ops.cond(finite, lambda: self._apply_finite(grads, tvs), lambda: None)
        self._update_state(finite, flags, grad_norm)

    def _update_state(self, finite, flags, grad_norm):
        """Scale, growth tracker, hysteresis and counters after one step (branch-free)."""
        skipped = ops.logical_not(finite)
        tracker = self.step_counter.value + 1
        grow = ops.logical_and(finite, ops.greater_equal(tracker, self.growth_interval))
        hyst = self.hysteresis_left.value
        back = ops.logical_and(skipped, ops.less_equal(hyst, 1))
        scale = self.dynamic_scale.value
        new_scale = ops.where(grow, scale * self.growth_factor,
                              ops.where(back, scale * self.backoff_factor, scale))
        self.dynamic_scale.assign(ops.clip(new_scale, self.min_scale, self.max_scale))
        self.step_counter.assign(ops.where(ops.logical_or(grow, skipped), 0, tracker))
        self.hysteresis_left.assign(
            ops.where(grow, self.hysteresis,
                      ops.where(ops.logical_and(skipped, ops.greater(hyst, 1)), hyst - 1, hyst))
        )
        as_int = ops.cast(skipped, self.skipped_steps.dtype)
        self.skipped_steps.assign_add(as_int)
        self.consecutive_skips.assign((self.consecutive_skips.value + as_int) * as_int)
        self.nonfinite_counts.assign(ops.where(skipped, flags, self.nonfinite_counts.value))
        self.grad_norm.assign(ops.where(finite, grad_norm, self.grad_norm.value))

    # ----------------------------------------------------------------- from Python
    @property
    def loss_scale(self) -> float:
        """The current loss scale (a host read)."""
        return float(ops.convert_to_numpy(self.dynamic_scale)) if self.built else self.initial_scale

    @property
    def overflow_variables(self) -> list[str]:
        """Paths of the variables whose gradients were non-finite on the last skipped step."""
        if not self.built:
            return []
        counts = ops.convert_to_numpy(self.nonfinite_counts)
        return [v.path for v, c in zip(optimizer_built_for(self), counts) if c > 0]

    def overflow_summary(self, limit: int = 6) -> str:
        """`overflow_variables` for one line: the first `limit` paths and how many more."""
        names = self.overflow_variables
        if not names:
            return "(none recorded)"
        text = ", ".join(names[:limit]) + (
            f" and {len(names) - limit} more" if len(names) > limit else "")
        if len(names) > limit and len(names) == len(optimizer_built_for(self)):
            return f"all {len(names)} trainable variables ({text})"
        return text

    def state(self) -> dict:
        """The scaler state as Python numbers, in one read per variable.

        Example:
        >>> LossScaleOptimizer(keras.optimizers.SGD()).state()["loss_scale"]
        32768.0
        """
        if not self.built:
            return {"loss_scale": self.initial_scale, "step_counter": 0,
                    "hysteresis_left": self.hysteresis, "skipped_steps": 0,
                    "consecutive_skips": 0, "grad_norm": 0.0}
        return {key: ops.convert_to_numpy(getattr(self, name)).item()
                for key, name in STATE_VARIABLES.items()}

    def check_skip_budget(self):
        """Raises `NonFiniteGradientsError` when the consecutive-skip budget is spent."""
        if self.max_consecutive_skips is None or not self.built:
            return
        n = int(ops.convert_to_numpy(self.consecutive_skips))
        if n >= self.max_consecutive_skips:
            names = self.overflow_summary()
            raise NonFiniteGradientsError(
                f"{n} consecutive steps had non-finite gradients "
                f"(max_consecutive_skips={self.max_consecutive_skips}); loss scale is "
                f"{self.loss_scale:g}. Non-finite gradients in: {names}. Look for an overflow in "
                "those layers (kmp FP32 islands, bfloat16, or a lower learning rate)."
            )

    def get_config(self):
        """Keras's LossScaleOptimizer config (`name`, `inner_optimizer`, `initial_scale`,
        `dynamic_growth_steps`) and kmp's settings beside it; `from_config` takes both."""
        return {
            **super().get_config(),
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "hysteresis": self.hysteresis,
            "min_scale": self.min_scale,
            "max_scale": self.max_scale,
            "max_consecutive_skips": self.max_consecutive_skips,
        }
