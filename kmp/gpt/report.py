"""What a pretraining run leaves behind: loss history and curves, samples, metrics.json."""

from __future__ import annotations

import hashlib
import math
import os
import textwrap
import time

import keras

from kmp import distributed
from kmp.callbacks import BatchLoss
from kmp.checkpoint import optimizer_steps, write_json_atomic
from kmp.gpt.sharding import state_bytes_per_device
from kmp.hardware import detect
from kmp.scaling import LossScaleOptimizer

METRIC_KEYS = ("policy", "steps", "final_train_loss", "val_loss", "val_perplexity",
               "tokens_per_sec", "mfu", "skipped_steps", "final_loss_scale", "recoveries",
               "wall_seconds")


def _json(value: float):
    return value if math.isfinite(value) else None


def _float(value) -> float:
    return math.nan if value is None else float(value)


class LossHistory(keras.callbacks.Callback):
    """Records the training loss and loss scale of every batch and the validation loss of
    every epoch.

    Each batch's own loss is read with `kmp.callbacks.BatchLoss` (logged by models that
    `kmp.compile` prepared, else derived from Keras's running mean).

    Args:
        batches_per_step: int. Micro-batches per optimizer step (gradient accumulation); the
            recorded step number is the optimizer step. Defaults to 1.
        state: dict or None. A history to continue (from a checkpoint). Defaults to None.
    """

    def __init__(self, batches_per_step=1, state=None):
        super().__init__()
        self.batches_per_step = batches_per_step
        state = state or {}
        self.train = [(x, _float(y)) for x, y in state.get("train", [])]  # (step, loss) per batch
        self.val = [(x, _float(y)) for x, y in state.get("val", [])]  # (step, loss) per epoch
        self.loss_scale = list(state.get("loss_scale", []))  # per batch; None: no scaling
        self._batches = len(self.train)
        self._losses = BatchLoss()

    def state(self) -> dict:
        """JSON-serializable history (strict JSON: a non-finite loss is null), for
        checkpoints and history.json."""
        return {"train": [[x, _json(y)] for x, y in self.train],
                "val": [[x, _json(y)] for x, y in self.val],
                "loss_scale": list(self.loss_scale)}

    def on_epoch_begin(self, epoch, logs=None):
        self._losses.reset()

    def on_train_batch_end(self, batch, logs=None):
        loss = self._losses(batch, logs)
        if loss is None:
            return
        self._batches += 1
        self.train.append((self._batches / self.batches_per_step, loss))
        scale = logs.get("loss_scale")
        self.loss_scale.append(None if scale is None else float(scale))

    def on_epoch_end(self, epoch, logs=None):
        if logs and "val_loss" in logs:
            self.val.append((self._batches / self.batches_per_step, float(logs["val_loss"])))

    def final_train_loss(self, window=20) -> float | None:
        """Mean training loss over the last `window` batches whose loss was finite."""
        tail = [loss for _, loss in self.train if math.isfinite(loss)][-window:]
        return sum(tail) / len(tail) if tail else None


def plot_losses(history: LossHistory, path, title: str, recoveries=()):
    """Writes a PNG of the training loss per step and the validation loss per evaluation,
    with each recovery's abandoned steps in red over the span it rolled back (a spike's
    values run off the top: the axis fits the kept losses)."""
    from matplotlib.figure import Figure  # not pyplot: no global backend change

    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.subplots()
    kept = [loss for _, loss in history.train if math.isfinite(loss)]
    if history.train:
        steps, losses = zip(*history.train)
        ax.plot(steps, losses, lw=0.8, alpha=0.7, label="train (per step)")
    if history.val:
        steps, losses = zip(*history.val)
        ax.plot(steps, losses, "o-", label="validation")
    if kept:
        ax.set_ylim(min(kept) - 0.05 * (max(kept) - min(kept)), max(kept) * 1.05)
    for i, rec in enumerate(recoveries):
        if rec.get("abandoned_losses"):
            steps, losses = zip(*[(x, math.nan if y is None else y)
                                  for x, y in rec["abandoned_losses"]])
            ax.plot(steps, losses, lw=0.8, color="tab:red",
                    label="rolled back" if i == 0 else None)
        ax.axvspan(rec["rolled_back_to"], rec["step"] + 1, color="tab:red", alpha=0.12)
        ax.annotate(f"{rec['cause']} at {rec['step']}: back to {rec['rolled_back_to']}",
                    (rec["step"], ax.get_ylim()[1]), fontsize=7, ha="right", va="top",
                    color="tab:red", xytext=(-2, -2 - 9 * i), textcoords="offset points")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("\n".join(textwrap.wrap(title, 64)), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right" if recoveries else "best")
    fig.tight_layout()
    fig.savefig(path)


def sample_text(model, tokenizer, prompts, max_length, seed=0, k=40, temperature=0.8):
    """Texts generated from `prompts` by `model` with keras-hub's top-k sampler (the
    tokenizer's preprocessor is attached to `model` if it has none)."""
    import keras_hub

    from kmp.gpt.run import attach_preprocessor

    if not prompts:
        return []
    if model.preprocessor is None:
        attach_preprocessor(model, tokenizer, max_length)
    model.sampler = keras_hub.samplers.TopKSampler(k=k, seed=seed, temperature=temperature)
    model.generate_function = None  # rebuilt for the new sampler
    return [str(t) for t in model.generate(list(prompts), max_length=max_length)]


def perplexity(loss: float) -> float:
    """exp(loss), or inf when it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def summary(metrics: dict, vocab_size: int) -> str:
    """The closing lines of a run, from its metrics."""
    tps, mfu, scale = metrics["tokens_per_sec"], metrics["mfu"], metrics["final_loss_scale"]
    speed = f"{tps:,.0f} tokens/s" if tps else "tokens/s not measured (too few steps)"
    if mfu is not None:
        speed += f", MFU {mfu:.1%}"
    scaling = f"final loss scale {scale:g}" if scale is not None else "no loss scaling"
    return "\n".join([
        f"validation loss {metrics['val_loss']:.3f}, perplexity {metrics['val_perplexity']:.1f} "
        f"(a uniform guess: ln({vocab_size}) = {math.log(vocab_size):.2f})",
        f"{metrics['steps']} steps in {metrics['wall_seconds']:.0f} s, {speed}",
        f"{metrics['policy']}: {metrics['skipped_steps']} skipped steps, {scaling}",
        *([f"{len(metrics['recoveries'])} recover(ies): "
           + "; ".join(f"step {r['step']} {r['cause']}" for r in metrics["recoveries"])]
          if metrics.get("recoveries") else []),
    ])


def attention_summary(model) -> dict | None:
    """metrics.json's `attention` entry: the kernel `kmp.harden` chose ("fused", "island", or
    "mixed" when shape classes differ), the measured worst errors in ulps of the compute
    dtype (fused path vs float32 island), the tolerance, and whether the numbers were
    "measured" or "cached" (`kmp.layers.attention_choices`); None before `harden`."""
    from kmp.layers import attention_choices

    choices = attention_choices(model)
    if not choices:
        return None
    first = choices[0]

    def worst(name):
        return max((getattr(c, name) for c in choices if getattr(c, name) is not None),
                   default=None)

    return {"choice": first.choice if len({c.choice for c in choices}) == 1 else "mixed",
            "requested": first.requested, "source": first.source,
            "compute_dtype": first.compute_dtype, "fused_ulps": worst("fused_ulps"),
            "island_ulps": worst("island_ulps"), "tolerance_ulps": first.tolerance_ulps,
            "classes": [c.as_dict() for c in choices]}


def weights_checksum(model) -> str:
    """SHA-256 of every weight's bytes, in order: equal across processes that agree."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(w.tobytes())
    return digest.hexdigest()


def finish(model, config, out, cache, val_ds, history: LossHistory, throughput,
           recoveries: list, started: float) -> int:
    """A finished run's outputs in `out`: the validation loss (evaluated by every process),
    then, by process 0, samples.txt, loss.png, history.json, metrics.json, model.keras
    (with its tokenizer, so `load_model(path).generate(...)` works) and preset/ (a plain
    keras-hub preset, `kmp.gpt.hub_preset`), and the closing lines.
    `recoveries` are the run's (`kmp.recovery.RecoveryPlan.recoveries`). Returns the exit
    status, 0."""
    from kmp.gpt.run import attach_preprocessor

    val_loss = float(model.evaluate(val_ds, verbose=0, return_dict=True)["loss"])
    state_bytes = state_bytes_per_device(model)
    distributed.gather(model)  # weights split across processes: whole on each from here on
    checksum = weights_checksum(model)
    print(f"weights sha256: {checksum}")
    if not distributed.is_chief():
        return 0
    tokenizer, samples = cache.tokenizer(), []
    if distributed.process_count() == 1:  # sampling is not SPMD: one process only
        samples = sample_text(model, tokenizer, [config.prompt] * config.samples,
                              max_length=min(config.seq_len, 128), seed=config.seed)
    elif config.samples:
        print("samples: not drawn in a run across processes; load model.keras to sample")
    (out / "samples.txt").write_text("\n\n-----\n\n".join(samples) + "\n")
    policy = keras.config.dtype_policy().name
    plot_losses(history, out / "loss.png", f"{config.preset}: {policy} on {detect().describe()}",
                recoveries)
    scaler = model.optimizer if isinstance(model.optimizer, LossScaleOptimizer) else None
    state = scaler.state() if scaler is not None else {}
    metrics = {
        "policy": policy,
        "steps": optimizer_steps(model.optimizer),
        "final_train_loss": history.final_train_loss(),
        "val_loss": val_loss,
        "val_perplexity": perplexity(val_loss),
        "tokens_per_sec": throughput.tokens_per_sec,
        "mfu": throughput.mfu,
        "skipped_steps": int(state.get("skipped_steps", 0)),
        "final_loss_scale": state.get("loss_scale"),
        "recoveries": recoveries,
        "attention": attention_summary(model),
        "processes": distributed.process_count(),
        "state_bytes_per_device": state_bytes,
        "weights_sha256": checksum,
        "wall_seconds": time.time() - started,
    }
    write_json_atomic(out / "history.json", history.state())
    write_json_atomic(out / "metrics.json", metrics)
    if model.preprocessor is None:
        attach_preprocessor(model, tokenizer, min(config.seq_len, 128))
    tmp = out / "model.tmp.keras"
    with distributed.local():
        model.save(tmp)
    os.replace(tmp, out / "model.keras")
    from kmp.gpt.hub_preset import write_run_preset

    with distributed.local():  # process 0 alone, like model.keras
        write_run_preset(out, log=lambda *a: None)  # preset/: keras-hub's own classes

    if samples:
        print(f"\nsample ({config.prompt!r}):\n{samples[0]}\n")
    print(summary(metrics, config.vocab_size))
    print(f"outputs in {out}/: metrics.json, history.json, samples.txt, loss.png, "
          "model.keras, preset/, checkpoints/, tensorboard/")
    return 0
