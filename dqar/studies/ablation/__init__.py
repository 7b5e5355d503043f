"""The ablation: its grid, runner, records, fidelity scoring, per-block timing and verification."""
