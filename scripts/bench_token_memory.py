"""Peak memory of the per-token loss at a large vocabulary: the chunked output layer against all positions at once.

One training step of an ``lm:`` student (forward, the per-token loss, backward) over ``--batch`` rows of
``--seq-len`` ids with a vocabulary of ``--vocab`` (default 50,257, GPT-2's), on a ``topk:K`` teacher's fields at
T = 1 (random, as a set stores them: ids, log-probabilities, the tail mass), once per ``--chunks`` value. ``0``
means every position in one chunk, which is what a loss without chunking holds: the [B x L, V] float32 logits, their
softmax and their gradient at once. Each leg runs in a fresh process, so its peak is its own:

- on a CPU, the peak of torch's tensors allocated during the step, net of those it frees (the profiler's
  ``profile_memory`` events; resident memory is no measure here, as the allocator reuses pages it already holds);
- on a GPU (``--device cuda``), ``torch.cuda.max_memory_allocated`` less what was allocated before the step.

Every leg must give the same loss (to 1e-5, relative) and the same gradient (to 1e-4): chunking changes how much is
held at once, not the maths. ``seconds`` is a second step, timed without the profiler. Usage::

    python scripts/bench_token_memory.py                           # V = 50,257, 8 x 512 ids, chunks 0 (all), 1024, 256
    python scripts/bench_token_memory.py --device cuda --json
    python scripts/bench_token_memory.py --quick                   # a smoke run (V = 5,000, 2 x 64 ids)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_setup import ROOT, machine  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _cpu_peak_mb(step) -> float:
    """Peak MB of torch's CPU tensors allocated while ``step()`` runs, net of those it frees: the running total of
    the profiler's allocation events (``Total Allocated``), which starts at 0 with the profile."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as d:
        trace = Path(d) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"
              and e.get("args", {}).get("Device Type") == 0]
    return max(totals, default=0) / 2 ** 20


def one_leg(a) -> dict:
    """The step with ``a.chunk`` positions a chunk (0: all), in this process: peak memory, seconds, loss, gradient."""
    import torch

    from transferset.training.students import create_student
    from transferset.training.token_losses import TokenLoss

    torch.manual_seed(0)
    dev = torch.device(a.device)
    model = create_student(a.student, [a.seq_len], a.vocab).to(dev)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq_len), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((a.batch, 1), -1)], dim=1)
    length = torch.full((a.batch,), a.seq_len)
    k = a.k
    index = torch.stack([torch.randperm(a.vocab, generator=g)[:k].clone() for _ in range(a.batch * a.seq_len)])
    log_p = torch.log_softmax(torch.randn(a.batch * a.seq_len, k + 1, generator=g) * 2, dim=-1)
    teacher = {"topk_index": index.reshape(a.batch, a.seq_len, k).to(torch.int32),
               "topk_log_probs": log_p[:, :k].reshape(a.batch, a.seq_len, k).half(),
               "tail_log_mass": log_p[:, k].reshape(a.batch, a.seq_len).half()}
    ids, labels, length = ids.to(dev), labels.to(dev), length.to(dev)
    teacher = {n: t.to(dev) for n, t in teacher.items()}
    chunk = a.chunk or a.batch * a.seq_len
    loss_fn = TokenLoss("kd", "topk", 0.9, 1.0, chunk=chunk)
    # a warm-up step on one row of 8 positions: torch's first-use allocations are not the step's memory
    few = {n: t[:1, :8] for n, t in teacher.items()}
    TokenLoss("kd", "topk", 0.9, 1.0, chunk=8)(model, ids[:1, :8], few, labels[:1, :8],
                                               torch.full((1,), 8, device=dev))["loss"].backward()
    model.zero_grad(set_to_none=True)
    def step() -> torch.Tensor:
        res = loss_fn(model, ids, teacher, labels, length)
        res["loss"].backward()
        return res["loss"]

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev) / 2 ** 20
        loss = step()
        torch.cuda.synchronize(dev)
        step_mb = torch.cuda.max_memory_allocated(dev) / 2 ** 20 - before
    else:
        box = []
        step_mb = _cpu_peak_mb(lambda: box.append(step()))
        loss = box[0]
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()  # a second step, timed without the profiler
    step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    sec = time.perf_counter() - t
    head = [p for n, p in model.named_parameters() if p.grad is not None][-1]
    return {"chunk": a.chunk, "positions": a.batch * a.seq_len, "step_mb": round(step_mb, 1),
            "seconds": round(sec, 3), "loss": float(loss), "grad": head.grad.flatten()[:4096].tolist()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--student", default="lm:2,256,4")
    ap.add_argument("--k", type=int, default=32, help="the teacher's topk:K")
    ap.add_argument("--chunks", default="0,1024,256", help="positions per chunk, one leg each (0: all at once)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="a smoke run: V = 5,000, 2 x 64 ids, chunks 0 and 32")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--leg", type=int, default=None, help=argparse.SUPPRESS)  # a child: run one chunk size
    a = ap.parse_args(argv)
    if a.quick:
        a.vocab, a.batch, a.seq_len, a.chunks, a.student = 5000, 2, 64, "0,32", "lm:1,32,2"
    if a.leg is not None:
        a.chunk = a.leg
        print(json.dumps(one_leg(a)))
        return {}
    legs = []
    for chunk in (int(c) for c in a.chunks.split(",")):
        cmd = [sys.executable, __file__, "--leg", str(chunk), "--vocab", str(a.vocab), "--batch", str(a.batch),
               "--seq-len", str(a.seq_len), "--student", a.student, "--k", str(a.k), "--device", a.device]
        p = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"leg chunk={chunk} failed: {p.stderr.strip().splitlines()[-1:]}")
        legs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    ref = legs[0]
    for leg in legs[1:]:
        if abs(leg["loss"] - ref["loss"]) > 1e-5 * max(1.0, abs(ref["loss"])):
            raise SystemExit(f"chunk {leg['chunk']} gives loss {leg['loss']}, all at once {ref['loss']}")
        worst = max(abs(x - y) for x, y in zip(leg["grad"], ref["grad"]))
        if worst > 1e-4:
            raise SystemExit(f"chunk {leg['chunk']}: the head's gradient differs by {worst:.2e} from all at once")
    full_logits_mb = a.batch * a.seq_len * a.vocab * 4 / 2 ** 20
    out = {"vocab": a.vocab, "batch": a.batch, "seq_len": a.seq_len, "student": a.student, "k": a.k,
           "device": a.device, "full_logits_mb": round(full_logits_mb, 1),
           "legs": [{k: v for k, v in leg.items() if k != "grad"} for leg in legs], "machine": machine()}
    print(f"per-token loss memory: {a.student}, V = {a.vocab:,}, {a.batch} x {a.seq_len} positions, topk:{a.k} "
          f"teacher, {a.device}; the [B x L, V] float32 logits alone are {full_logits_mb:,.0f} MB")
    print(f"{'positions a chunk':<20}{'step memory (MB)':>18}{'seconds':>10}{'loss':>12}")
    for leg in legs:
        print(f"{leg['chunk'] or leg['positions']:<20,}{leg['step_mb']:>18,.1f}{leg['seconds']:>10.2f}"
              f"{leg['loss']:>12.6f}")
    print("every leg gives the same loss and gradient (chunking changes what is held at once, not the maths)")
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
