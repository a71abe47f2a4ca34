"""Peer trainers for the training-speed benchmark (see shared BENCHMARKS.md).

Each runner is a standalone module run as a child process that prints one JSON line on stdout:
- `rechub_mmoe`, `deepctr_mmoe`: the peers, run in the bench venv (`make bench-venv`);
- `reference`: the compute reference (hand-written MMoE on random in-memory inputs), main venv.
"""
