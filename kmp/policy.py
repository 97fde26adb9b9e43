"""The one switch: `set_policy("auto"|name)` picks and sets a Keras dtype policy and says why."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

from kmp.errors import UserError
from kmp.hardware import Hardware, detect

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
CHOICES = ("auto",) + POLICIES


@contextlib.contextmanager
def global_policy(name):
    """Keras's global dtype policy is `name` inside the block; the previous one is restored
    after it, also when the block raises."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)

# What `kmp bench` measured (small and tiny GPT presets, tokens/s against float32 with the same
# XLA setting; keras 3.15, TF 2.21; docs/benchmarks.md) on CPUs with native bf16, per Keras
# backend, and the machines it ran on: never this machine's own figures, so the reasons that cite
# them say where they come from.
_XEON = "2-core Intel Xeons with AVX512_BF16 and AMX (three sessions)"
_EPYC = "a 2-core AMD EPYC with AVX512_BF16 and no AMX"
CPU_MEASURED = {
    "tensorflow": ("TensorFlow: bf16 1.3x to 1.7x float32's tokens/s without XLA, 0.8x to 1.0x "
                   f"with XLA; fp16 0.7x to 1.0x; measured on {_XEON} and on {_EPYC}"),
    "jax": ("JAX: bf16 1.1x float32's tokens/s with XLA (always on under JAX); fp16 0.8x to "
            f"1.0x; measured on {_EPYC}"),
    "torch": ("torch (eager): bf16 1.2x to 1.4x float32's tokens/s; fp16 0.2x to 0.3x; "
              f"measured on {_EPYC}"),
}


def _measured() -> str:
    """The CPU measurements for the active backend, saying where they were made."""
    from kmp import backends

    return f"kmp bench, GPT presets, {CPU_MEASURED[backends.name()]}; docs/benchmarks.md"


def _cpu_flags(hw: Hardware) -> str:
    """The bf16 flags this CPU has, as Intel names them: 'AVX512_BF16 and AMX_BF16'."""
    return " and ".join(f.upper() for f in hw.cpu_flags)


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    """What `set_policy` decided.

    Args:
        policy: str. The Keras dtype policy name: float32, mixed_float16 or mixed_bfloat16.
        loss_scaling: bool. True exactly when the compute dtype is float16.
        jit_compile: bool. The recommended `jit_compile` for `model.compile` on this device
            and Keras backend.
        device: str. What was detected, in one line.
        reason: str. One sentence on why this policy and XLA setting.
        warning: str or None. Why an explicit choice is slow or unsupported here.
        decided_by: str. "rule table" (the hardware rules below), "measurement" (`kmp tune`
            just now), "cached measurement" (an earlier `kmp tune` on this machine and
            backend, `kmp.decisions`) or "request" (an explicit policy).
        attention: str or None. The attention kernel a measurement chose ("fused" or
            "island"); None: `kmp.harden(attention="auto")` decides per layer.
    """

    policy: str
    loss_scaling: bool
    jit_compile: bool
    device: str
    reason: str
    warning: str | None = None
    decided_by: str = "rule table"
    attention: str | None = None

    @property
    def compute_dtype(self) -> str:
        """The dtype layers compute in under this policy."""
        return {"float32": "float32", "mixed_float16": "float16"}.get(self.policy, "bfloat16")

    def __str__(self) -> str:
        xla = "XLA on" if self.jit_compile else "XLA off"
        scaling = ", loss scaling" if self.loss_scaling else ""
        return f"{self.policy} ({xla}{scaling}), by {self.decided_by}: {self.reason}"


def recommend(hw: Hardware) -> tuple[str, bool, str]:
    """The policy, XLA setting and reason that `auto` picks for `hw`."""
    if hw.kind == "tpu":
        return "mixed_bfloat16", True, "TPUs compute natively in bfloat16 under XLA."
    if hw.kind == "gpu":
        cc = hw.compute_capability or (0, 0)
        if cc >= (8, 0):
            return "mixed_bfloat16", True, (
                f"compute capability {cc[0]}.{cc[1]} has bfloat16 Tensor Cores; bfloat16 keeps "
                "float32's range, so no loss scaling is needed."
            )
        if cc >= (7, 0):
            return "mixed_float16", True, (
                f"compute capability {cc[0]}.{cc[1]} has float16 Tensor Cores but no bfloat16; "
                "float16 needs loss scaling."
            )
        return "float32", True, (
            f"compute capability {cc[0]}.{cc[1]} predates Tensor Cores (7.0), so half precision "
            "saves memory but not time."
        )
    if hw.cpu_bf16:
        return "mixed_bfloat16", False, (
            f"this CPU ({hw.name}) has {_cpu_flags(hw)} (native bfloat16); on such CPUs bf16 "
            f"trained faster than float32 ({_measured()})."
        )
    return "float32", True, (
        "this CPU has no native bfloat16 or float16 arithmetic, so half precision is emulated "
        "and slower than float32."
    )


def _warning_for(policy: str, hw: Hardware) -> str | None:
    cc = hw.compute_capability or (0, 0)
    if policy == "mixed_float16":
        if hw.kind == "cpu":
            return ("float16 on CPUs is no faster than float32 and needs loss scaling "
                    f"({_measured()}).")
        if hw.kind == "tpu":
            return "TPUs have no float16 units; use mixed_bfloat16."
        if cc < (7, 0):
            return f"compute capability {cc[0]}.{cc[1]} has no Tensor Cores; float16 is not faster."
    if policy == "mixed_bfloat16":
        if hw.kind == "cpu" and not hw.cpu_bf16:
            return "this CPU has no AVX512_BF16 or AMX, so bfloat16 is emulated and slow."
        if hw.kind == "gpu" and cc < (8, 0):
            return (
                f"compute capability {cc[0]}.{cc[1]} has no bfloat16 Tensor Cores (need 8.0+); "
                "bfloat16 is emulated and slow here. Use mixed_float16."
            )
    return None


def pointless(policy: str, jit: bool, hw: Hardware) -> str | None:
    """Why training under `policy` with XLA `jit` cannot be the fastest choice on `hw`, by the
    rules and the measurements they cite, or None. A tuning (`kmp tune`) skips such
    candidates unless their policy is named: half precision the hardware only emulates or
    runs no faster than float32 (`set_policy`'s warnings), and on CPUs under TensorFlow
    bfloat16 with XLA (no faster than float32 there, while bfloat16 without XLA is).

    Example:
    >>> cpu = Hardware("cpu", "Xeon", count=2, cpu_flags=("amx_bf16",))
    >>> pointless("float32", True, cpu) is None, "float16" in pointless("mixed_float16", False, cpu)
    (True, True)
    """
    from kmp import backends

    # XLA both on and off (TensorFlow; JAX keeps it on, torch stays eager)
    xla_optional = backends.jit_compile_for(True)[0] and not backends.jit_compile_for(False)[0]
    if hw.kind == "cpu" and policy == "mixed_bfloat16" and jit and xla_optional:
        return f"bfloat16 with XLA on CPUs is no faster than float32 ({_measured()})."
    return _warning_for(policy, hw)


def _on_backend(jit: bool, reason: str) -> tuple[bool, str]:
    """The hardware's XLA choice as the active Keras backend takes it, and the reason with the
    backend's note where it differs (see `kmp.backends.jit_compile_for`)."""
    from kmp import backends

    jit, note = backends.jit_compile_for(jit)
    return jit, reason if note is None else f"{reason} {note}"


def _check_name(name: str) -> str:
    if name not in CHOICES:
        raise UserError(f"Unknown precision {name!r}. Use one of: {', '.join(CHOICES)}.",
                        field="precision")
    return name


def _is_tuning(result) -> bool:
    """Whether `result` is a tuning's result (`kmp.tuning.Tuning` or one like it)."""
    return all(hasattr(result, name) for name in (
        "policy", "jit_compile", "attention", "reason", "source"))


def _from_measurement(hw: Hardware, measure, data) -> PrecisionPlan | None:
    """The plan a measurement gives: `measure`'s (run now, or its cached result), else a
    cached `kmp tune` of this machine and backend, else None."""
    if data is not None and not callable(measure):
        raise UserError("data= goes with measure=model_fn (the batch to train it on). "
                        f"Received measure={measure!r}.")
    if measure is not None:
        if callable(measure) and data is None:  # before data=, a callable returned a tuning
            tuned = measure()
            if not _is_tuning(tuned):
                raise UserError("measure=model_fn needs data=(x, y): one batch of the shape "
                                "you train with, to train each candidate on.")
        elif callable(measure):  # your own model: kmp.model_tuning trains it
            from kmp.model_tuning import tune

            tuned = tune(measure, data, hardware=hw)
        elif _is_tuning(measure):
            tuned = measure  # a tuning already made
        else:  # a GPT config: the recipe's tuner, loaded only when asked for
            from kmp.gpt.autotune import tune
            from kmp.gpt.config import GPTConfig

            if not isinstance(measure, GPTConfig):
                raise UserError(f"measure= takes a function that returns your compiled model "
                                f"(with data=), a kmp.gpt.GPTConfig or a tuning result. "
                                f"Received: {measure!r}")
            tuned = tune(measure, hardware=hw)
        policy, jit, reason = tuned.policy, tuned.jit_compile, tuned.reason
        attention = tuned.attention
        by = "cached measurement" if tuned.source == "cached" else "measurement"
    else:
        from kmp import decisions

        found = decisions.lookup(decisions.key("precision", hw, model="any"))
        if found is None:
            return None
        policy, jit, attention = found["policy"], found["jit_compile"], found["attention"]
        reason, by = found["reason"], "cached measurement"
    return PrecisionPlan(policy, policy == "mixed_float16", jit, hw.describe(), reason,
                         decided_by=by, attention=attention)


def plan(name: str = "auto", hardware: Hardware | None = None, measure=None,
         data=None) -> PrecisionPlan:
    """Returns the plan for `name` on `hardware` without changing the Keras policy.

    "auto" takes a measurement where there is one (`measure`, else the latest `kmp tune` of
    this machine and backend, cached by `kmp.decisions`) and the hardware rule table
    otherwise; the plan's `decided_by` says which.

    Args:
        name: str. "auto", "float32", "mixed_float16" or "mixed_bfloat16". Defaults to "auto".
        hardware: Hardware or None. Defaults to `kmp.hardware.detect()`.
        measure: callable, GPTConfig, tuning result or None. With "auto": measure now (or
            take the cached measurement of that model and candidates): a function that
            returns your compiled Keras model, trained on `data` (`kmp.model_tuning.tune`);
            a `kmp.gpt.GPTConfig` (`kmp tune`, `kmp.gpt.autotune.tune`); or a result either
            returned (or, without `data`, a function returning one). Defaults to None.
        data: tuple or None. With a model function: `(x, y)`, one batch of the shape you
            train with. Defaults to None.

    Returns:
        A `PrecisionPlan`.

    Raises:
        UserError: if `name` is not one of the choices, or `measure` and `data` do not fit.

    Example:
    >>> plan("float32").loss_scaling
    False
    """
    _check_name(name)
    hw = hardware or detect()
    if name == "auto":
        measured = _from_measurement(hw, measure, data)
        if measured is not None:
            return measured
    best, best_jit, why = recommend(hw)
    if name == "auto" or name == best:
        jit, why = _on_backend(best_jit, why)
        return PrecisionPlan(best, best == "mixed_float16", jit, hw.describe(), why,
                             decided_by="rule table" if name == "auto" else "request")
    warning = _warning_for(name, hw)
    # XLA: on accelerators always; on CPU it helps float32 and float16 but hurts bfloat16.
    jit, reason = _on_backend(hw.kind != "cpu" or name != "mixed_bfloat16",
                              f"explicitly requested; auto would pick {best}.")
    return PrecisionPlan(name, name == "mixed_float16", jit, hw.describe(), reason, warning,
                         decided_by="request")


def set_policy(name: str = "auto", hardware: Hardware | None = None, measure=None,
               data=None) -> PrecisionPlan:
    """Sets the Keras global dtype policy: the one switch.

    After it, unchanged `model.compile` / `model.fit` trains in mixed precision (Keras wraps the
    optimizer for loss scaling under mixed_float16); `kmp.compile` adds the rest of the plan.

    Args:
        name: str. "auto", "float32", "mixed_float16" or "mixed_bfloat16". "auto" picks from the
            hardware. An explicit choice that is slow here is honoured with a warning.
            Defaults to "auto".
        hardware: Hardware or None. Defaults to `kmp.hardware.detect()`.
        measure: callable, GPTConfig, tuning result or None. With "auto", decide by
            measuring (see `plan`): `set_policy("auto", measure=build, data=(x, y))` trains
            the model `build()` returns (compiled) a few steps under every candidate, or
            takes the cached result for that model and batch; `measure=kmp.gpt.preset(
            "small")` does the same for a GPT preset (`kmp tune`). Defaults to None: the
            cached `kmp tune` of this machine if any, else the rule table.
        data: tuple or None. With a model function: `(x, y)`, one batch of the shape you
            train with. Defaults to None.

    Returns:
        The `PrecisionPlan` that was applied.

    Raises:
        UserError: if `name` is unknown, or `measure` and `data` do not fit.

    Example:
    >>> import keras
    >>> p = set_policy("float32")
    >>> keras.config.dtype_policy().name
    'float32'
    """
    import keras

    chosen = plan(name, hardware, measure, data)
    if chosen.warning:
        warnings.warn(f"kmp: {chosen.policy} honoured, but {chosen.warning}", stacklevel=2)
    keras.config.set_dtype_policy(chosen.policy)
    return chosen
