"""The reuse engine: configs, plans, INT8 cache, signals, deciders, executors and `enable` (lowest layer above the base utilities)."""
