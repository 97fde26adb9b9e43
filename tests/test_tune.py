"""The precision trial (kmp.tuning; kmp.model_tuning for your own model) and `kmp tune`
(kmp.gpt.autotune): candidates trained interleaved, rejected on loss or skipped steps, clearly
slower ones stopped after a round, the fastest of the rest chosen and cached per model and
candidate set. Tiny models and fake clocks: the tests check the decisions, never a timing."""

import itertools
from pathlib import Path

import keras
import numpy as np
import pytest

import kmp
from kmp import backends, decisions, model_tuning, tuning
from kmp.errors import UserError
from kmp.gpt import autotune
from kmp.gpt.config import GPTConfig
from kmp.tuning import LOSS_TOLERANCE, Candidate, choose

pytestmark = pytest.mark.backends
CORPUS = Path(__file__).parent / "data" / "corpus.txt"
X = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
Y = X.sum(axis=1, keepdims=True)
XLA = dict.fromkeys(backends.jit_compile_for(choice)[0] for choice in (True, False))
CPU = kmp.hardware.Hardware("cpu", "Xeon", count=2, cpu_flags=("amx_bf16",))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(decisions.ENV, str(tmp_path / "kmp-cache"))


def _cand(policy, jit, step, first=7.0, final=6.0, skipped=0):
    return Candidate(policy, jit, "fused", step_seconds=[step], losses=[final],
                     first_loss=first, skipped=skipped)


def _dense():
    """A small non-GPT model, compiled as a user would for fit."""
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    return model


class _Clock:
    """A fake clock that each training step of a model advances by that model's cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def slowed(self, model, cost):
        train = model.train_on_batch

        def train_on_batch(*args, **kwargs):
            self.now += cost
            return train(*args, **kwargs)

        model.train_on_batch = train_on_batch
        return model


def test_choose_rejects_wrong_losses_and_skips_then_takes_the_fastest():
    cands = [_cand("float32", True, 0.30), _cand("float32", False, 0.32),
             _cand("mixed_float16", False, 0.10, skipped=2),  # fastest, but overflowed
             _cand("mixed_bfloat16", True, 0.12, final=6.0 * (1 + 2 * LOSS_TOLERANCE)),
             _cand("mixed_bfloat16", False, 0.20, final=6.03),
             _cand("mixed_float16", True, 0.05, final=7.5)]  # the loss rose
    best = choose(cands)
    assert (best.policy, best.jit) == ("mixed_bfloat16", False)
    verdicts = [c.verdict.split(":")[0] for c in cands]
    assert verdicts == ["accepted", "accepted", "rejected", "rejected", "chosen", "rejected"]
    assert "skipped" in cands[2].verdict and "from float32's" in cands[3].verdict
    assert "did not fall" in cands[5].verdict


def test_choose_keeps_float32_on_a_tie_and_needs_float32():
    cands = [_cand("float32", True, 0.2), _cand("mixed_bfloat16", True, 0.2)]
    assert choose(cands).policy == "float32"
    # Within the 5% margin the simpler policy wins: bfloat16 (no loss scaling) over float16.
    cands = [_cand("float32", True, 0.3), _cand("mixed_float16", False, 0.19),
             _cand("mixed_bfloat16", False, 0.195)]
    best = choose(cands)
    assert best.policy == "mixed_bfloat16" and "simpler" in best.verdict
    assert cands[1].verdict.startswith("accepted")
    with pytest.raises(UserError, match="needs float32"):
        choose([_cand("mixed_bfloat16", True, 0.2)])
    with pytest.raises(UserError, match="no candidate"):
        choose([_cand("float32", True, 0.2, final=7.5)])


def test_candidates_skip_what_the_rules_make_pointless_unless_named():
    default = tuning.candidates(None, CPU)
    assert len(default) == 3 * len(XLA)
    skipped = [c for c in default if c.verdict]
    assert all(c.verdict.startswith("skipped by rule") for c in skipped)
    assert {c.policy for c in skipped} >= {"mixed_float16"}
    assert not any(c.policy == "float32" for c in skipped)
    named = tuning.candidates(["float32", "mixed_float16"], CPU)
    assert len(named) == 2 * len(XLA) and not any(c.verdict for c in named)
    gpu = kmp.hardware.Hardware("gpu", "A100", (8, 0))
    assert not any(c.verdict for c in tuning.candidates(None, gpu))


def test_trial_stops_clearly_slower_candidates_and_logs_progress():
    clock, lines = _Clock(), []
    cost = {"float32": 1.0, "mixed_bfloat16": 2.0}  # bfloat16 "twice as slow" here

    def build(cand):
        return clock.slowed(model_tuning._compiled(_dense, cand), cost[cand.policy])

    result = tuning.measure("dense", build, lambda step: (X, Y), (16, "samples"),
                            ["float32", "mixed_bfloat16"], chunk=2, repeats=3, timer=clock,
                            log=lines.append)
    assert (result.policy, result.attention, result.source) == ("float32", None, "measured")
    assert result.compile_seconds > 0 and result.seconds >= result.compile_seconds
    rows = [r for r in result.table.splitlines() if r.startswith("| mixed_bfloat16")]
    assert rows and all("dropped after round 1: 2.00x" in r for r in rows)
    log = "\n".join(lines)
    assert "built and compiled in" in log and "round 1/3" in log and "done in" in log
    # Several float32 candidates (XLA on and off) race on; a lone one stops after round 1.
    rounds = 3 if len(XLA) == 2 else 1
    assert f"round {rounds}/3: float32" in log and f"round {rounds + 1}/3" not in log


@pytest.mark.parametrize("steal", [0, 30])
def test_a_trial_the_hypervisor_slowed_says_so(monkeypatch, steal):
    reads = itertools.count(1)  # each read of /proc/stat: 100 ticks later, `steal` of them stolen
    monkeypatch.setattr(kmp.hardware, "cpu_ticks", lambda: (lambda n: (n * steal, n * 100))(
        next(reads)))

    def run():
        clock = _Clock()
        return tuning.measure("dense", lambda c: clock.slowed(model_tuning._compiled(_dense, c),
                                                              1.0),
                              lambda step: (X, Y), (16, "samples"), ["float32"], chunk=1,
                              repeats=1, timer=clock, log=lambda line: None)

    result = run()
    warned = f"warning: the hypervisor took {steal}% of the CPU time during this trial"
    assert (warned in result.table) == (steal >= 10)
    again = run()
    assert again.source == "cached" and again.table == result.table  # the warning stays with it


def test_the_cache_key_holds_the_candidates_and_a_model_fn_drives_auto():
    clock = itertools.count(0.0, 1.0)  # every timed turn "1 s": a tie, float32 first
    only32 = model_tuning.tune(_dense, (X, Y), ["float32"], chunk=1, repeats=1,
                         timer=lambda: next(clock), log=lambda *_: None, hardware=CPU)
    assert only32.policy == "float32" and "samples/s" in only32.table
    assert kmp.plan("auto", CPU).decided_by == "rule table"  # not every policy: not "the latest"
    # Every policy is another question: measured, not answered by the float32-only tuning (on
    # a CPU with bf16, as CPU says: on one without, the rules leave float32 alone to measure).
    p = kmp.set_policy("auto", CPU, measure=_dense, data=(X, Y))
    assert p.decided_by == "measurement" and p.policy in ("float32", "mixed_bfloat16")
    assert kmp.set_policy("auto", CPU, measure=_dense, data=(X, Y)).decided_by == (
        "cached measurement")
    assert kmp.plan("auto", CPU).decided_by == "cached measurement"  # this machine's latest
    with pytest.raises(UserError, match="compiled with an optimizer and a loss.*not compiled"):
        model_tuning.tune(lambda: keras.Sequential([keras.Input((8,))]), (X, Y))

    def no_loss():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
        model.compile("sgd")
        return model

    with pytest.raises(UserError, match="compiled with an optimizer and a loss.*without a loss"):
        model_tuning.tune(no_loss, (X, Y))
    class Unbuilt(keras.Model):  # a subclassed model has no weights until it is called
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    unbuilt = Unbuilt()
    unbuilt.compile("sgd", "mse")
    assert "Unbuilt: not built, batch [16, 8]" in model_tuning._describe(unbuilt, (X, Y))
    with pytest.raises(UserError, match=r"data= takes \(x, y\)"):
        model_tuning.tune(_dense, X)
    keras.config.set_dtype_policy("float32")


def test_kmp_tune_measures_caches_and_drives_auto(tmp_path, monkeypatch):
    config = GPTConfig(vocab_size=512, num_layers=1, num_heads=2, hidden_dim=32,
                       intermediate_dim=64, seq_len=32, batch_size=4, corpus=str(CORPUS),
                       cache_dir=str(tmp_path / "tokens"), learning_rate=1e-2)
    with pytest.raises(UserError, match="needs float32"):  # before any training
        autotune.tune(config, ["mixed_bfloat16"], log=lambda *_: None)
    clock = itertools.count(0.0, 1.0)  # every timed chunk takes "1 s": a tie, float32 first
    tuned = autotune.tune(config, chunk=2, repeats=2, hardware=CPU, timer=lambda: next(clock),
                          log=lambda *_: None)
    assert tuned.source == "measured" and tuned.policy == "float32"
    assert "| float32, XLA" in tuned.table and "| mixed_bfloat16, XLA" in tuned.table
    assert "| mixed_float16, XLA" in tuned.table and "skipped by rule" in tuned.table
    assert tuned.table.count("chosen") == 1 and "rejected" not in tuned.table
    # The cache answers the next call without training, and set_policy("auto") uses it.
    monkeypatch.setattr(autotune, "_build", lambda *a: pytest.fail("measured again"))
    again = autotune.tune(config, hardware=CPU)
    assert again.source == "cached" and again.policy == tuned.policy
    p = kmp.set_policy("auto", CPU, measure=config)
    assert (p.policy, p.jit_compile, p.decided_by) == (
        "float32", tuned.jit_compile, "cached measurement")
    assert kmp.plan("auto", CPU).decided_by == "cached measurement"  # this machine's latest
    # A new Keras or backend version: the rule table decides again.
    monkeypatch.setattr(decisions, "current_versions", lambda: {"keras": "99"})
    assert kmp.plan("auto", CPU).decided_by == "rule table"
    keras.config.set_dtype_policy("float32")
