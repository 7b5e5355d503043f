"""Studies: the ablation runner, fidelity sections, policy evaluation, bench, peers, timing and memory."""
