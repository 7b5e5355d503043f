"""Measurement: timing protocol, confidence intervals, memory, compile-cache artifacts."""
