"""The executor bench, its families, peers, table and the fail-fast GPU smoke run."""
