"""Benchmark peers: what a user would train with instead of kmp, written here, of the same
shape as a kmp GPT preset, for `kmp bench --peer`. Not part of kmp's training path."""
