"""Build the shipped text corpus and its BPE tokenizer (data/text/), once, and record how.

The corpus is the reStructuredText source of the Python 3.11 documentation as Debian's ``python3.11-doc``
package ships it (``/usr/share/doc/python3.11/html/_sources``), under the PSF licence (data/text/LICENSE, the
documentation's own licence page). One document per source file, in sorted path order, written as JSON lines
``{"path": ..., "text": ...}`` to ``data/text/pydocs.jsonl``; the last ``--heldout`` fraction of the documents
(every 20th in sorted order) goes to ``pydocs-heldout.jsonl`` and is never used to train the tokenizer, the
teacher or a student. Sections are taken in the order below until ``--max-mb`` of text.

A byte-level BPE tokenizer (the ``tokenizers`` package) with ``--vocab`` ids, ``<|endoftext|>`` as id 0 and
``<|pad|>`` as id 1, is trained on the training documents and saved as ``data/text/tokenizer.json``.

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb /tmp/pydoc
    python scripts/make_lm_corpus.py --source /tmp/pydoc/usr/share/doc/python3.11/html/_sources
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("tutorial", "howto", "faq", "glossary.rst.txt", "reference", "extending", "using", "library")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="the _sources folder of an extracted python3.11-doc")
    ap.add_argument("--out", default=str(ROOT / "data" / "text"))
    ap.add_argument("--max-mb", type=float, default=4.0)
    ap.add_argument("--heldout-every", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    src, out = Path(args.source), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for section in SECTIONS:
        p = src / section
        files += sorted(p.rglob("*.rst.txt")) if p.is_dir() else [p]
    docs, total = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8").strip()
        if not text:
            continue
        if total + len(text.encode()) > args.max_mb * 1e6:
            break
        docs.append({"path": str(f.relative_to(src)), "text": text})
        total += len(text.encode())
    train = [d for i, d in enumerate(docs) if (i + 1) % args.heldout_every]
    held = [d for i, d in enumerate(docs) if (i + 1) % args.heldout_every == 0]
    for name, part in (("pydocs.jsonl", train), ("pydocs-heldout.jsonl", held)):
        with open(out / name, "w", encoding="utf-8") as fh:
            for d in part:
                fh.write(json.dumps(d, ensure_ascii=False) + "\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator((d["text"] for d in train), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    n_tok = sum(len(tok.encode(d["text"]).ids) for d in train)
    n_held = sum(len(tok.encode(d["text"]).ids) for d in held)
    for name in ("pydocs.jsonl", "pydocs-heldout.jsonl", "tokenizer.json"):
        print(name, hashlib.sha256((out / name).read_bytes()).hexdigest())
    print(f"{len(train)} training documents ({n_tok} tokens), {len(held)} held out ({n_held} tokens), "
          f"{total / 1e6:.2f} MB, vocabulary {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
