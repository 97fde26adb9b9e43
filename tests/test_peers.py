"""The PyTorch reference peer of `kmp bench --peer torch`."""

import json
from pathlib import Path

import numpy as np

import kmp.gpt as gpt
from kmp.cli import main
from kmp.peers.torch_gpt import TorchPeer

CONFIG = dict(num_layers=2, hidden_dim=32, num_heads=2, intermediate_dim=64, seq_len=16,
              vocab_size=128, batch_size=4)


def test_peer_has_the_presets_shape_and_trains():
    for name in ("tiny", "small", "gpt2-124m"):
        config = gpt.preset(name)
        assert TorchPeer(config, "float32").parameter_count() == gpt.param_count(config), name
    config = gpt.preset("tiny", **CONFIG, warmup_steps=0, learning_rate=3e-3)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 128, (4, 17))
    for policy in ("float32", "mixed_bfloat16", "mixed_float16"):
        peer = TorchPeer(config, policy)
        losses = [peer.train_step(x[:, :-1], x[:, 1:]) for _ in range(20)]
        assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], (policy, losses)


def test_bench_runs_the_peer_on_the_same_batches(tmp_path, capsys):
    args = ["bench", "--corpus", str(Path(__file__).parent / "data" / "corpus.txt"),
            "--vocab-size", "512", "--seq-len", "16", "--batch-size", "4", "--num-layers", "1",
            "--num-heads", "2", "--hidden-dim", "16", "--intermediate-dim", "32", "--chunk", "2",
            "--repeats", "2", "--warmup", "1", "--policies", "float32,mixed_bfloat16", "--xla",
            "off", "--peer", "torch", "--cache-dir", str(tmp_path / "cache"), "--out",
            str(tmp_path)]
    assert main(args) == 0
    runs = {r["run"]: r for r in json.loads((tmp_path / "bench.json").read_text())["runs"]}
    peers = [r for name, r in runs.items() if name.startswith("torch peer")]
    assert len(peers) == 2 and all(0 < r["final_loss"] < r["first_loss"] for r in peers)
    out = capsys.readouterr().out
    assert "| mixed_bfloat16 | mixed_bfloat16, XLA off |" in out and "kmp / peer" in out
