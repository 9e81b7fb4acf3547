"""What a ``label`` run did, for every source kind: :class:`LabelResult` and the one line the CLI prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..wording import plural

__all__ = ["LabelResult"]


@dataclass
class LabelResult:
    """What a label run did: ``status`` is ``written``, ``resumed`` or ``already-complete``."""

    out: Path
    manifest: dict
    status: str
    rows_written: int
    seconds: float
    rows_total: int = 0
    extra: dict = field(default_factory=dict)

    def summary_line(self) -> str:
        st = self.manifest.get("stats", {})
        if "claim" in self.extra:
            return self._claim_line()
        if self.extra.get("engine") == "ray":
            e, st = self.extra, self.manifest.get("stats", {})
            cpu = (f" ({e['on_cpu']} of them on the CPU, though each held {e['gpus']:g} Ray GPU: no CUDA provider in "
                   "onnxruntime, or no CUDA driver, on their nodes; --device cuda makes that an error)"
                   if e.get("gpus") and e.get("on_cpu") else "")
            return (f"{self.out}: {e['tasks']} Ray task(s) in {e['processes']} worker process(es) on "
                    f"{plural(e.get('nodes', 1), 'node')}{cpu} wrote {self.rows_written} rows in {self.seconds:.1f} s; "
                    f"the set is complete: {st.get('rows', 0)} rows in {len(self.manifest['shards'])} shards")
        if "part" in self.extra:
            return self._part_line()
        if self.status == "already-complete":
            return (f"{self.out}: already complete ({plural(st.get('rows', 0), 'row')} in "
                    f"{plural(len(self.manifest['shards']), 'shard')}); nothing to do")
        rate = self.rows_written / self.seconds if self.seconds > 0 else float("nan")
        acc = st.get("ensemble_accuracy")
        acc_s = f", ensemble accuracy {acc:.4f} on labelled rows" if acc is not None else ""
        verb = "resumed and wrote" if self.status == "resumed" else "wrote"
        skipped = st.get("skipped_files")
        skip_s = "" if skipped is None else f"; {plural(skipped, 'bad image file')} skipped (listed by `transferset info`)"
        return (f"{self.out}: {verb} {plural(self.rows_written, 'row')} in {self.seconds:.1f} s ({rate:,.0f} rows/s); "
                f"{plural(st.get('rows', 0), 'row')} in {plural(len(self.manifest['shards']), 'shard')}{acc_s}{skip_s}")

    def _claim_line(self) -> str:
        e = self.extra
        shards = e["shards_labelled"]
        rate = self.rows_written / self.seconds if self.seconds > 0 else float("nan")
        did = (f"labelled {len(shards)} shard(s), {self.rows_written} rows in {self.seconds:.1f} s ({rate:,.0f} rows/s)"
               + (f", {len(e['taken_over'])} taken over from expired leases" if e["taken_over"] else "")
               if shards else "found no shard left to claim")
        st = self.manifest.get("stats", {})
        end = (f"the set is complete: {st.get('rows', 0)} rows in {len(self.manifest['shards'])} shards"
               + (" (merged by this worker)" if e["merged"] else "")) if self.manifest else "the set is not complete"
        return f"{self.out}: worker {e['claim']} {did}; {end}"

    def _part_line(self) -> str:
        index, count = self.extra["part"]
        rate = self.rows_written / self.seconds if self.seconds > 0 else float("nan")
        did = "already done" if self.status == "already-complete" else \
            f"{'resumed and wrote' if self.status == 'resumed' else 'wrote'} {self.rows_written} rows in " \
            f"{self.seconds:.1f} s ({rate:,.0f} rows/s)"
        if self.extra.get("merged"):
            st = self.manifest.get("stats", {})
            by = " (merged by this part)" if self.extra.get("merged_here") else ""
            return (f"{self.out}: part {index} of {count} {did}; the set is complete: "
                    f"{plural(st.get('rows', 0), 'row')} in {plural(len(self.manifest['shards']), 'shard')}{by}")
        return f"{self.out}: part {index} of {count} {did}; waiting for the others: {self.extra.get('waiting')}"
