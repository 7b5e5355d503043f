"""Scale: torchrun-sharded sampling and FID."""
