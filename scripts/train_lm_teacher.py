"""Train the language-model teacher shipped in data/teachers/ (lm-teacher.onnx), once, and record how.

A GPT-style causal transformer (transferset.training.lm.CausalLM: pre-norm blocks, learned positions, tied
output layer) over the BPE vocabulary of data/text/tokenizer.json, trained on data/text/pydocs.jsonl (the
training documents packed into one stream with ``<|endoftext|>`` between them; each step reads ``--batch``
random windows of ``--seq-len + 1`` tokens) with AdamW, linear warm-up and cosine decay. The held-out documents
(data/text/pydocs-heldout.jsonl) are only watched: their perplexity is logged every ``--log-every`` steps and the
last step's weights are shipped, whatever it says.

The ONNX export takes ``input_ids`` int64 [batch, length] and gives ``logits`` float32 [batch, length, vocab],
both axes dynamic (length up to ``--max-len``); the exported graph is checked against torch at two lengths.
The run merges an ``lm-teacher`` entry (sha256, command, seed, architecture, log) into teachers.json.

    nice -n 10 python scripts/train_lm_teacher.py --layers 3 --dim 160 --heads 4 --steps 800 --warmup 60 --threads 1 --log-every 100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transferset.training.lm import CausalLM  # noqa: E402


def token_stream(path: Path, tokenizer) -> np.ndarray:
    """The documents of a JSON-lines file tokenized and joined with the end-of-text id (0) between them."""
    eot = tokenizer.token_to_id("<|endoftext|>")
    out: list[int] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        out += tokenizer.encode(json.loads(line)["text"]).ids + [eot]
    return np.asarray(out, dtype=np.int64)


@torch.no_grad()
def heldout_nll(model: CausalLM, stream: np.ndarray, seq_len: int, batch: int = 16) -> float:
    """Mean next-token negative log-likelihood (nats) over consecutive windows of the held-out stream."""
    model.eval()
    n = (len(stream) - 1) // seq_len
    x = torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len))
    y = torch.from_numpy(stream[1: n * seq_len + 1].reshape(n, seq_len))
    total = 0.0
    for i in range(0, n, batch):
        total += F.cross_entropy(model(x[i:i + batch]).flatten(0, 1), y[i:i + batch].flatten(), reduction="sum").item()
    model.train()
    return total / (n * seq_len)


def export(model: CausalLM, path: Path, seq_len: int) -> None:
    model.eval()
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, seq_len, dtype=torch.int64),), str(tmp), dynamo=False,
                          opset_version=17, do_constant_folding=False, input_names=["input_ids"],
                          output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "length"},
                                        "logits": {0: "batch", 1: "length"}})
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    for shape in ((3, seq_len), (2, 37)):
        ids = torch.randint(0, model.vocab, shape)
        with torch.no_grad():
            want = model(ids).numpy()
        got = sess.run(None, {"input_ids": ids.numpy()})[0]
        if got.shape != want.shape or not np.allclose(got, want, atol=1e-3, rtol=1e-3):
            raise SystemExit(f"the exported graph disagrees with torch at shape {shape}")
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(ROOT / "data" / "text" / "pydocs.jsonl"))
    ap.add_argument("--heldout", default=str(ROOT / "data" / "text" / "pydocs-heldout.jsonl"))
    ap.add_argument("--tokenizer", default=str(ROOT / "data" / "text" / "tokenizer.json"))
    ap.add_argument("--out", default=str(ROOT / "data" / "teachers"))
    ap.add_argument("--name", default="lm-teacher")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--dim", type=int, default=160)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=2100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer)
    train, held = token_stream(Path(args.text), tok), token_stream(Path(args.heldout), tok)
    vocab = tok.get_vocab_size()
    model = CausalLM(vocab, args.layers, args.dim, args.heads, args.max_len, args.dropout)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    log, t0 = [], time.time()
    window = args.seq_len + 1
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train) - window, size=args.batch)
        xy = torch.from_numpy(np.stack([train[s:s + window] for s in starts]))
        loss = F.cross_entropy(model(xy[:, :-1]).flatten(0, 1), xy[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps:
            nll = heldout_nll(model, held, args.seq_len)
            entry = {"step": step, "seconds": round(time.time() - t0, 1), "train_loss": round(loss.item(), 4),
                     "heldout_ppl": round(math.exp(nll), 2)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.onnx"
    export(model, path, args.seq_len)
    entry = {
        "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "kind": "lm",
        "architecture": f"CausalLM: {args.layers} pre-norm blocks, dim {args.dim}, {args.heads} heads, "
                        f"learned positions up to {args.max_len}, tied output; input_ids int64 [B, L] -> "
                        f"logits [B, L, {vocab}]",
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer": {"file": "../text/tokenizer.json",
                      "sha256": hashlib.sha256(Path(args.tokenizer).read_bytes()).hexdigest(), "vocab": vocab},
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "seed": args.seed, "options": {k: v for k, v in vars(args).items() if k not in ("text", "heldout",
                                                                                    "tokenizer", "out")},
        "train_tokens": int(len(train)), "heldout_tokens": int(len(held)), "log": log,
        "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{args.threads} threads",
    }
    index_path = out / "teachers.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"teachers": {}}
    index["teachers"][args.name] = entry
    tmp = index_path.with_name(".teachers.json.tmp")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, index_path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), sha256 {entry['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
