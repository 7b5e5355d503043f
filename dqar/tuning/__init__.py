"""Decisions learned from full-compute traces: calibrated plans and the learned policy's traces, training and distillation."""
