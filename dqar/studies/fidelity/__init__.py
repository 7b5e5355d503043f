"""The fidelity sections of docs/FIDELITY.md: engine, forecast, dynamic evidence, policy."""
