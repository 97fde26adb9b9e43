"""`kmp tune` (kmp.gpt.autotune): candidates trained interleaved, rejected on loss or skipped
steps, the fastest of the rest chosen and cached. Tiny shapes and a fake clock: the tests check
the decisions, never a timing."""

import itertools
from pathlib import Path

import pytest

import kmp
from kmp import decisions
from kmp.errors import UserError
from kmp.gpt import autotune
from kmp.gpt.autotune import LOSS_TOLERANCE, Candidate, choose
from kmp.gpt.config import GPTConfig

pytestmark = pytest.mark.backends
CORPUS = Path(__file__).parent / "data" / "corpus.txt"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(decisions.ENV, str(tmp_path / "kmp-cache"))


def _cand(policy, jit, step, first=7.0, final=6.0, skipped=0):
    return Candidate(f"{policy} {jit}", policy, jit, step_seconds=[step], first_loss=first,
                     final_loss=final, skipped=skipped)


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


def test_tune_measures_caches_and_drives_auto(tmp_path, monkeypatch):
    config = GPTConfig(vocab_size=512, num_layers=1, num_heads=2, hidden_dim=32,
                       intermediate_dim=64, seq_len=32, batch_size=4, corpus=str(CORPUS),
                       cache_dir=str(tmp_path / "tokens"), learning_rate=1e-2)
    clock = itertools.count(0.0, 1.0)  # every timed chunk takes "1 s": a tie, float32 first
    tuning = autotune.tune(config, ("float32", "mixed_bfloat16"), chunk=2, repeats=2,
                           warmup=0, timer=lambda: next(clock), log=lambda *_: None)
    assert tuning.source == "measured" and tuning.policy == "float32"
    assert "| float32, XLA" in tuning.table and "| mixed_bfloat16, XLA" in tuning.table
    assert tuning.table.count("chosen") == 1 and "rejected" not in tuning.table
    # The cache answers the next call without training, and set_policy("auto") uses it.
    monkeypatch.setattr(autotune, "_build", lambda *a: pytest.fail("measured again"))
    again = autotune.tune(config, ("float32", "mixed_bfloat16"))
    assert again.source == "cached" and again.policy == tuning.policy
    p = kmp.set_policy("auto", measure=config)
    assert (p.policy, p.jit_compile, p.decided_by) == (
        "float32", tuning.jit_compile, "cached measurement")
    assert kmp.plan("auto").decided_by == "cached measurement"  # this machine's latest
    # A new Keras or backend version: the rule table decides again.
    monkeypatch.setattr(decisions, "current_versions", lambda: {"keras": "99"})
    assert kmp.plan("auto").decided_by == "rule table"
