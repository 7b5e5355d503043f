"""The progress bars of `dqar ablate`: one over configurations, one per block over its runs."""
from __future__ import annotations


class Bars:
    """An overall progress bar over configurations and one per block over its runs."""

    def __init__(self, total: int, done: int, enabled: bool):
        from tqdm.auto import tqdm

        self._tqdm, self.enabled = tqdm, enabled
        self.overall = tqdm(total=total, initial=done, desc="ablation", unit="config", disable=not enabled, position=0)
        self.inner = None

    def start(self, name: str, runs: int) -> None:
        self.close_inner()
        self.inner = self._tqdm(total=runs, desc=name[:40], unit="run", leave=False, disable=not self.enabled, position=1)

    def expect(self, more: int) -> None:
        """The runs still to come: the bar's total becomes what ran so far plus `more`."""
        if self.inner is not None:
            self.inner.total = self.inner.n + more
            self.inner.refresh()

    def tick(self) -> None:
        if self.inner is not None:
            self.inner.update(1)

    def finish(self, configs: int) -> None:
        self.close_inner()
        self.overall.update(configs)

    def close_inner(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None

    def close(self) -> None:
        self.close_inner()
        self.overall.close()
