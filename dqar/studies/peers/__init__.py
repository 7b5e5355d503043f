"""Peer methods run through their own packages, and their rows on copies of the model."""
