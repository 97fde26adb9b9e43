"""Decisions by measurement: `kmp.harden(attention="auto")` and the on-disk cache (kmp.decisions).

The fake fused kernels are MultiHeadAttention subclasses whose own attention path (what
Keras's fused `dot_product_attention` is for the stock layer) computes the probabilities
exactly (float32 scores and softmax) or with the softmax in the compute dtype. The measurement
must keep the first and replace the second by the float32 island; what the layer computes
afterwards is measured again, not read from a flag.
"""

import json
import math

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

import kmp
from kmp import decisions
from kmp import layers as L
from kmp.diagnostics import attention as attention_diagnostics
from kmp.diagnostics import attention_precision
from kmp.diagnostics.attention import FLOAT32_ULPS

pytestmark = pytest.mark.backends
HALF = ["mixed_float16", "mixed_bfloat16"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(decisions.ENV, str(tmp_path / "kmp-cache"))
    return tmp_path / "kmp-cache"


@pytest.fixture
def measurements(monkeypatch):
    """Counts the probes `harden` runs (each measures one path of one layer)."""
    calls = []
    real = attention_diagnostics.measure_ulps

    def counting(layer, *args, **kwargs):
        calls.append(layer.name)
        return real(layer, *args, **kwargs)

    monkeypatch.setattr(attention_diagnostics, "measure_ulps", counting)
    return calls


class _FakeFused(keras.layers.MultiHeadAttention):
    """Its own attention path: float32 scores, then a softmax in `softmax_dtype` (None: float32;
    "compute": the layer's compute dtype), the probabilities rounded to the compute dtype."""

    softmax_dtype = None

    def _compute_attention(self, query, key, value, attention_mask=None, training=None,
                           return_attention_scores=False, use_causal_mask=False):
        scores = ops.einsum("btnh,bsnh->bnts", ops.cast(query, "float32"),
                            ops.cast(key, "float32")) * (1.0 / math.sqrt(self.key_dim))
        if attention_mask is not None:
            scores = ops.where(ops.cast(attention_mask, "bool")[:, None], scores, -1e9)
        if self.softmax_dtype == "compute":
            scores = ops.cast(scores, self.compute_dtype)
        probs = ops.cast(ops.softmax(scores, axis=-1), self.compute_dtype)
        return ops.einsum("bnts,bsnh->btnh", probs, ops.cast(value, self.compute_dtype)), None


class ExactFused(_FakeFused):
    pass


class FailingFused(_FakeFused):
    """A kernel this platform cannot run (as JAX's fused float16 attention under jit on a
    CPU)."""

    def _compute_attention(self, *args, **kwargs):
        raise ValueError("The precision 'F16_F16_F32' is not supported by dot_general on CPU")


class HalfSoftmaxFused(_FakeFused):
    softmax_dtype = "compute"


def _built(cls, policy, dropout=0.0):
    layer = cls(num_heads=2, key_dim=16, dropout=dropout, dtype=policy)
    x = np.random.default_rng(0).normal(size=(1, 4, 32)).astype("float32")
    layer(x, x)
    return layer


# ------------------------------------------------------------------ the decision
@pytest.mark.parametrize("policy", HALF)
def test_auto_keeps_an_exact_fused_kernel(policy, measurements):
    layer = _built(ExactFused, policy)
    kmp.harden(layer, attention="auto")
    (choice,) = L.attention_choices(layer)
    assert (choice.choice, choice.source, choice.layers) == ("fused", "measured", 1)
    assert choice.fused_ulps <= 0.51 and choice.island_ulps <= 0.51, str(choice)
    assert choice.tolerance_ulps == FLOAT32_ULPS and len(measurements) == 2
    # What the layer computes now is its own path, exactly as measured.
    (row,) = attention_precision(layer)
    assert row.route == "Keras fused dot_product_attention"
    assert row.max_ulps == pytest.approx(choice.fused_ulps)


@pytest.mark.parametrize("policy", HALF)
def test_auto_replaces_a_half_precision_softmax_by_the_island(policy):
    layer = _built(HalfSoftmaxFused, policy)
    kmp.harden(layer, attention="auto")
    (choice,) = L.attention_choices(layer)
    assert choice.choice == "island" and choice.fused_ulps > FLOAT32_ULPS, str(choice)
    (row,) = attention_precision(layer)
    assert row.route == "kmp float32 island" and row.float32
    assert row.max_ulps == pytest.approx(choice.island_ulps) and row.max_ulps <= 0.51
    assert "fused" in str(choice) and "island" in str(choice)


def test_auto_keeps_the_island_where_the_fused_kernel_cannot_run():
    layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=16, dtype="mixed_float16")
    x = np.ones((1, 4, 32), "float32")
    layer(x, x)
    layer.__class__ = FailingFused  # built as a working layer, then its kernel fails
    kmp.harden(layer, attention="auto")
    (choice,) = L.attention_choices(layer)
    assert choice.choice == "island" and choice.fused_ulps is None
    assert "fails here: The precision 'F16_F16_F32'" in str(choice)
    assert attention_precision(layer)[0].route == "kmp float32 island"


def test_auto_under_float32_measures_nothing(measurements):
    layer = _built(HalfSoftmaxFused, "float32")
    kmp.harden(layer, attention="auto")
    (choice,) = L.attention_choices(layer)
    assert (choice.choice, choice.source) == ("fused", "float32 policy") and not measurements
    assert "nothing to harden" in str(choice)


@pytest.mark.parametrize("policy", HALF)
def test_auto_on_a_gpt2_chooses_what_the_model_then_computes(policy):
    """On the real keras-hub GPT-2 attention (Keras's fused path, dropout 0), whatever this
    backend's kernel measures: every layer computes the chosen path, within its measure."""
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    model = keras_hub.models.GPT2Backbone(96, 2, 2, 32, 64, dropout=0.0,
                                          max_sequence_length=16)
    kmp.harden(model, attention="auto")
    (choice,) = L.attention_choices(model)
    assert choice.layers == 2 and choice.source == "measured"
    kept = choice.fused_ulps is not None and choice.fused_ulps <= FLOAT32_ULPS
    assert choice.choice == ("fused" if kept else "island")
    rows = attention_precision(model)
    route = {"fused": "Keras fused dot_product_attention", "island": "kmp float32 island"}
    assert [r.route for r in rows] == [route[choice.choice]] * 2
    assert rows[0].max_ulps == pytest.approx(
        choice.fused_ulps if choice.choice == "fused" else choice.island_ulps)
    assert all(r.float32 for r in rows), [str(r) for r in rows]


def test_explicit_choices_and_backwards_compatibility(measurements):
    layer = _built(HalfSoftmaxFused, "mixed_bfloat16")
    kmp.harden(layer)  # True, the default: the island
    assert L.attention_choices(layer)[0].choice == "island"
    assert attention_precision(layer)[0].route == "kmp float32 island"
    kmp.harden(layer, attention=False)  # "fused": the island taken out again
    assert L.attention_choices(layer)[0].choice == "fused"
    assert attention_precision(layer)[0].route == "Keras fused dot_product_attention"
    kmp.harden(layer, attention="island")
    assert attention_precision(layer)[0].route == "kmp float32 island"
    assert not measurements
    with pytest.raises(ValueError, match="Unknown attention 'flash'. Use one of: auto"):
        kmp.harden(layer, attention="flash")


# ------------------------------------------------------------------ the cache
def test_a_measurement_is_cached_and_reused(cache_dir, measurements):
    first = _built(ExactFused, "mixed_bfloat16")
    kmp.harden(first, attention="auto")
    assert len(measurements) == 2  # the fused path and the island
    saved = json.loads((cache_dir / decisions.FILENAME).read_text())
    (entry,) = saved["entries"].values()
    assert entry["versions"] == decisions.current_versions()
    assert entry["value"]["choice"] == "fused"
    second = _built(ExactFused, "mixed_bfloat16")
    kmp.harden(second, attention="auto")
    (choice,) = L.attention_choices(second)
    assert choice.source == "cached" and choice.choice == "fused" and len(measurements) == 2
    assert "cached measurement" in str(choice)
    # Another shape class or compute dtype is measured on its own.
    kmp.harden(_built(ExactFused, "mixed_float16"), attention="auto")
    assert len(measurements) == 4


def test_a_new_keras_or_backend_version_measures_again(monkeypatch, measurements):
    kmp.harden(_built(ExactFused, "mixed_bfloat16"), attention="auto")
    current = decisions.current_versions()
    for changed in ({**current, "keras": current["keras"] + ".dev1"},
                    {k: v + "+new" for k, v in current.items()}):
        monkeypatch.setattr(decisions, "current_versions", lambda changed=changed: changed)
        before = len(measurements)
        layer = _built(ExactFused, "mixed_bfloat16")
        kmp.harden(layer, attention="auto")
        assert len(measurements) == before + 2
        assert L.attention_choices(layer)[0].source == "measured"
    entries = json.loads(decisions.cache_path().read_text())["entries"]
    assert len(entries) == 1  # the old versions' entry was replaced, not kept beside


def test_cache_survives_a_corrupt_file_and_writes_atomically(cache_dir):
    key = {"decision": "test"}
    cache_dir.mkdir(parents=True)
    (cache_dir / decisions.FILENAME).write_text("{not json")
    assert decisions.lookup(key, versions={"keras": "1"}) is None
    decisions.record(key, {"x": 1}, versions={"keras": "1"})
    assert decisions.lookup(key, versions={"keras": "1"})["x"] == 1
    assert [p.name for p in cache_dir.iterdir()] == [decisions.FILENAME]  # no temporary left


def test_metrics_summary_of_the_choice():
    from kmp.gpt.report import attention_summary

    layer = _built(HalfSoftmaxFused, "mixed_float16")
    assert attention_summary(layer) is None
    kmp.harden(layer, attention="auto")
    summary = attention_summary(layer)
    assert summary["choice"] == "island" and summary["source"] == "measured"
    assert summary["fused_ulps"] > summary["tolerance_ulps"] >= summary["island_ulps"]
    json.dumps(summary)


def test_config_attention_field():
    from kmp.gpt.config import GPTConfig

    assert GPTConfig().attention == "auto"
    with pytest.raises(ValueError, match="Unknown attention 'flash'"):
        GPTConfig(attention="flash")


def test_a_cached_measurement_is_judged_by_this_kmps_tolerance():
    layer = _built(ExactFused, "mixed_bfloat16")
    kmp.harden(layer, attention="auto")
    (key,) = json.loads(decisions.cache_path().read_text())["entries"]
    old = {"choice": "island", "fused_ulps": FLOAT32_ULPS - 0.5, "island_ulps": 0.5,
           "tolerance_ulps": 1.0, "seconds": 0.1}  # an older, stricter kmp's verdict
    decisions.record(json.loads(key), old)
    again = _built(ExactFused, "mixed_bfloat16")
    kmp.harden(again, attention="auto")
    (choice,) = L.attention_choices(again)
    assert (choice.choice, choice.source, choice.tolerance_ulps) == (
        "fused", "cached", FLOAT32_ULPS)
