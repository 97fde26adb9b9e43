"""What a pretraining run leaves behind: loss history and curves, samples, metrics.json."""

from __future__ import annotations

import math

import keras

from kmp.callbacks import BatchLoss

METRIC_KEYS = ("policy", "steps", "final_train_loss", "val_loss", "val_perplexity",
               "tokens_per_sec", "mfu", "skipped_steps", "final_loss_scale", "recoveries",
               "wall_seconds")


class LossHistory(keras.callbacks.Callback):
    """Records the training loss and loss scale of every batch and the validation loss of
    every epoch.

    Keras logs a running mean of the loss over the epoch; each batch's own loss is recovered
    from it (`kmp.callbacks.BatchLoss`).

    Args:
        batches_per_step: int. Micro-batches per optimizer step (gradient accumulation); the
            recorded step number is the optimizer step. Defaults to 1.
        state: dict or None. A history to continue (from a checkpoint). Defaults to None.
    """

    def __init__(self, batches_per_step=1, state=None):
        super().__init__()
        self.batches_per_step = batches_per_step
        state = state or {}
        self.train = [tuple(x) for x in state.get("train", [])]  # (step, loss) per batch
        self.val = [tuple(x) for x in state.get("val", [])]  # (step, loss) per epoch
        self.loss_scale = list(state.get("loss_scale", []))  # per batch; None: no scaling
        self._batches = len(self.train)
        self._losses = BatchLoss()

    def state(self) -> dict:
        """JSON-serializable history, for checkpoints."""
        return {"train": [list(x) for x in self.train], "val": [list(x) for x in self.val],
                "loss_scale": list(self.loss_scale)}

    def on_epoch_begin(self, epoch, logs=None):
        self._losses.reset()

    def on_train_batch_end(self, batch, logs=None):
        if not logs or "loss" not in logs:
            return
        self._batches += 1
        self.train.append((self._batches / self.batches_per_step,
                           self._losses.update(batch, logs["loss"])))
        scale = logs.get("loss_scale")
        self.loss_scale.append(None if scale is None else float(scale))

    def on_epoch_end(self, epoch, logs=None):
        if logs and "val_loss" in logs:
            self.val.append((self._batches / self.batches_per_step, float(logs["val_loss"])))

    def final_train_loss(self, window=20) -> float | None:
        """Mean training loss over the last `window` batches."""
        tail = [loss for _, loss in self.train[-window:]]
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
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right" if recoveries else "best")
    fig.tight_layout()
    fig.savefig(path)


def sample_text(model, tokenizer, prompts, max_length, seed=0, k=40, temperature=0.8):
    """Texts generated from `prompts` by `model` with keras-hub's top-k sampler."""
    import keras_hub

    if not prompts:
        return []
    model.preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=max_length)
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
