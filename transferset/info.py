"""``transferset info``: a transfer set's summary as lines people read (``--json`` prints the summary itself)."""

from __future__ import annotations

from pathlib import Path

from .errors import printable
from .wording import number, plural

__all__ = ["info_lines", "augment_text", "source_text"]


def _safe(v) -> str:
    return printable(v) if v is not None else "-"


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _temperature_key(t) -> tuple[int, float, str]:
    try:  # the mean entropy is keyed by "T:g" strings: numeric order, not "1, 2, 20, 4, 8"
        return 0, float(t), str(t)
    except (TypeError, ValueError):
        return 1, 0.0, str(t)


def augment_text(aug: dict | None) -> str:
    """``jitter:2, 3 views + clean`` (``none`` for a set of clean rows only)."""
    if not isinstance(aug, dict):
        return "-"
    spec, views, clean = aug.get("spec"), aug.get("views"), aug.get("clean_view", True)
    if not spec or not views:
        return "none (each source row once, as it is)"
    views_s = plural(views, "view") if _is_num(views) else _safe(views)
    text = f"{_safe(spec)}, {views_s}{' + clean' if clean else ''}"
    return text + (f" (seed {_safe(aug['seed'])})" if aug.get("seed") not in (None, 0) else "")


def source_text(src: dict | None) -> list[tuple[str, str]]:
    """``(key, text)`` lines: the source the set was labelled from, the rows of it that were used, its labels."""
    if not isinstance(src, dict) or not src:
        return []
    where = _safe(src.get("data"))
    if src.get("key"):
        where += f":{_safe(src['key'])}"
    lines = [("source", f"{where} ({_safe(src.get('format'))})")]
    rows, total = src.get("rows"), src.get("total_rows")
    if _is_num(rows):
        used = number(rows)
        if _is_num(total) and total != rows:
            used += f" of {number(total)}" + (f" (the first {number(rows)})" if src.get("limit") else "")
        lines.append(("source rows", used))
    if src.get("labels"):
        lines.append(("labels", _safe(src["labels"])))
    return lines


def _value(v) -> str:
    if isinstance(v, list):
        return ", ".join(_value(x) for x in v) if v else "-"
    if isinstance(v, dict):
        return ", ".join(f"{_safe(k)}: {_value(x)}" for k, x in v.items())
    return _safe(number(v) if _is_num(v) else v)


def info_lines(s: dict, folder: str | Path) -> list[str]:
    """The lines ``transferset info`` prints for the summary ``s`` of the set in ``folder``."""
    if "codec" not in s:  # an unmerged set labelled in parts
        return [f"{key:>18}: {_value(v)}" for key, v in s.items()]
    rows = s.get("rows")
    expected = s.get("expected_rows")
    state = "complete" if s.get("complete") else f"incomplete: {number(rows)} of {number(expected)} rows"
    members = s.get("members") or []
    kinds = sorted({str(k) for k in s.get("output_kinds") or [] if k})
    inp = s.get("input") or {}
    pairs: list[tuple[str, str]] = [("transfer set", f"{_safe(folder)} ({state})")]
    pairs += source_text(s.get("source"))
    pairs += [
        ("augment", augment_text(s.get("augment"))),
        ("rows", f"{number(rows)} in {plural(s.get('shards') or 0, 'shard')}"),
        ("members", f"{len(members)}: {', '.join(_safe(m) for m in members)}"
                    + (f" (output {', '.join(_safe(k) for k in kinds)})" if kinds else "")),
        ("classes", number(s.get("num_classes"))
         + (f": {', '.join(_safe(c) for c in s['class_names'][:20])}{', ...' if len(s['class_names']) > 20 else ''}"
            if s.get("class_names") else "")),
        ("input", f"{_safe(inp.get('dtype'))} {_safe(inp.get('shape'))}"
                  + (", stored in the set" if inp.get("stored") else ", replayed from the source")),
        ("temperatures", ", ".join(f"{t:g}" for t in sorted(s.get("temperatures") or []))),
        ("combine", _safe(s.get("combine"))),
        ("logits", f"{_safe(s.get('dtype'))}, codec {_safe(s.get('codec'))}"),
    ]
    acc = s.get("member_accuracy")
    if isinstance(acc, list) and acc:
        pairs.append(("member accuracy", ", ".join(f"{a:.4f}" if _is_num(a) else _safe(a) for a in acc)))
    if _is_num(s.get("ensemble_accuracy")):
        pairs.append(("ensemble accuracy", f"{s['ensemble_accuracy']:.4f} (on the rows with a label)"))
    ent = s.get("mean_entropy")
    if isinstance(ent, dict) and ent:
        pairs.append(("mean entropy", ", ".join(
            f"T={_safe(t)} {v:.4f}" if _is_num(v) else f"T={_safe(t)} {_safe(v)}"
            for t, v in sorted(ent.items(), key=lambda kv: _temperature_key(kv[0]))) + " nats"))
    hints = s.get("hints")
    if isinstance(hints, list):  # label --hint: one line per stored teacher tensor
        pairs += [("hint", _safe(h)) for h in hints]
    pairs.append(("format", f"schema {_safe(s.get('schema_version'))}, written by transferset "
                            f"{_safe(s.get('tool_version'))}"))
    return [f"{key:>18}: {value}" for key, value in pairs]
