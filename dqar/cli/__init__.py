"""`dqar` command line: a thin layer over the library (docs/ARCHITECTURE.md)."""
from dqar.cli.app import main

__all__ = ["main"]
