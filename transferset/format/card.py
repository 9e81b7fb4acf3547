"""The dataset card: a README.md inside a transfer set, written from its manifest alone.

A card is what people read first when a set is shared (the Hugging Face convention: README.md with a small YAML
header). Everything in it comes from the manifest, so it is deterministic (no dates) and rewriting it after every
manifest write keeps it true on resume. Strings from the manifest pass through :func:`printable` and markdown
table cells have their pipes escaped, so a hostile class name cannot break the layout or drive a terminal.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .._io import atomic_write_bytes
from ..errors import printable
from .codecs import codec_for
from .schema import Manifest
from ..wording import plural

__all__ = ["CARD_NAME", "render_card", "write_card"]

CARD_NAME = "README.md"


def _s(value) -> str:
    return printable(value).replace("|", "\\|") if value is not None else "-"


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else _s(v)


def _yaml_str(text: str) -> str:
    return '"' + printable(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _header(m: Manifest, license: str | None) -> list[str]:
    lines = ["---"]
    if license:
        lines.append(f"license: {_yaml_str(license)}")
    lines += ["tags:", "- knowledge-distillation", "- soft-labels", "- transferset", "---", ""]
    return lines


def _teachers(m: Manifest) -> list[str]:
    out = ["## Teachers", "", "| # | file | sha256 | input | output | kind |", "|---|---|---|---|---|---|"]
    for i, t in enumerate(m.teachers):
        inp = f"{_s(t.get('input_name'))} {_s(t.get('input_shape'))} {_s(t.get('input_dtype'))}"
        outp = f"{_s(t.get('output_name'))} {_s(t.get('output_shape'))}"
        out.append(f"| {i} | {_s(t.get('file'))} | `{_s(t.get('sha256'))}` | {inp} | {outp} | {_s(t.get('output_kind'))} |")
    w = ", ".join(f"{v:g}" for v in m.weights)
    temps = ", ".join(f"{t:g}" for t in m.temperatures)
    kept = codec_for(m.codec).card_text()
    out += ["", f"Combined with `{_s(m.combine)}` (weights {w}); soft targets stored at T = {temps}, as natural-log "
            f"probabilities in {_s(m.dtype)}; {kept}", ""]
    return out


def _source(m: Manifest) -> list[str]:
    src, aug, inp = m.source, m.augment, m.input
    pre = m.preprocess or {}
    out = ["## Source and options", "", "| field | value |", "|---|---|"]
    rows = [("source", src.get("data")), ("source format", src.get("format")),
            ("source rows used", src.get("rows")), ("source fingerprint", src.get("fingerprint")),
            ("labels", src.get("labels")), ("labels sha256", src.get("labels_sha256")),
            ("input", f"{inp.get('shape')} {inp.get('dtype')}, " + ("stored" if inp.get("stored") else "not stored (replay from the source)")),
            ("preprocess", ", ".join(f"{k}={v}" for k, v in sorted(pre.items()) if v is not None) or "none"),
            ("augment", aug.get("spec") or "none"), ("views per row", aug.get("views_per_row")),
            ("clean view", aug.get("clean_view")), ("seed", aug.get("seed")),
            ("shard size", m.shard_size), ("compression", m.compression), ("codec", m.codec),
            ("definition sha256", m.definition_sha256)]
    out += [f"| {k} | {_num(v) if not isinstance(v, str) else _s(v)} |" for k, v in rows if v is not None]
    return out + [""]


def _counts(m: Manifest) -> list[str]:
    st = m.stats or {}
    rows = st.get("rows", m.rows)
    state = "complete" if m.complete else f"incomplete: {m.rows:,} of {_num(m.expected_rows)} rows written so far"
    out = ["## Counts and statistics", "",
           f"- rows: {_num(rows)} in {plural(len(m.shards), 'shard')} ({state})",
           f"- classes: {m.num_classes}" + (f" ({', '.join(_s(n) for n in m.class_names[:20])}"
                                            f"{', ...' if len(m.class_names) > 20 else ''})" if m.class_names else ""),
           f"- labelled rows: {_num(st.get('labelled_rows'))}"]
    if st.get("member_accuracy") is not None:
        out.append("- member accuracy on labelled rows: " + ", ".join(f"{a:.4f}" for a in st["member_accuracy"]))
    if st.get("ensemble_accuracy") is not None:
        out.append(f"- ensemble accuracy (argmax at T=1): {st['ensemble_accuracy']:.4f}")
    ent = st.get("mean_entropy") or {}
    if ent:
        # in the manifest's temperature order: the JSON writer sorts keys as strings ("20" before "4")
        order = {f"{t:g}": i for i, t in enumerate(m.temperatures)}
        items = sorted(ent.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
        out.append("- mean entropy of the soft targets (nats): " + ", ".join(f"T={_s(t)}: {_num(v)}" for t, v in items))
    return out + [""]


def _hints(m: Manifest) -> list[str]:
    """The hint fields (label --hint), each with what it stores and its bytes a row (a raw tensor can cost more
    than the rest of the row together)."""
    if not m.hints:
        return []
    from .schema import row_bytes, shard_layout

    layout = shard_layout(m)
    base = row_bytes(layout, [n for n in layout if not n.startswith("hint_")])
    out = ["## Hints (intermediate teacher tensors per row)", "",
           f"Each row also holds these tensors of the teachers' graphs; the row without them takes {base:,} bytes.", "",
           "| field | tensor | member | reduce | tensor shape | stored | bytes a row |", "|---|---|---|---|---|---|---|"]
    for h in m.hints:
        cost = row_bytes(layout, [h["field"]])
        out.append(f"| {h['field']} | `{_s(h['tensor'])}` | {h['member']} | {h['reduce']} | {h['tensor_shape']} | "
                   f"{h['shape']} {h['dtype']} | {cost:,} |")
    return out + [""]


def render_card(manifest: Manifest, *, license: str | None = None, citation: str | None = None) -> str:
    """The markdown dataset card of a transfer set: teachers and sha256, source, options, counts, statistics.

    Args:
        manifest: the set's manifest (as :func:`transferset.format.read_manifest` returns it).
        license: a licence name or SPDX id for the labels (also put in the YAML header); omitted when None.
        citation: text (e.g. BibTeX) shown in a code block; omitted when None.

    Returns:
        The card's text; the same manifest and arguments always give the same text.
    """
    m = manifest
    title = f"Transfer set: {plural(m.num_members, 'teacher')}, {m.num_classes} classes, {_num(m.stats.get('rows', m.rows))} rows"
    out = _header(m, license) + [f"# {title}", "",
                                 "Soft labels from an ONNX teacher ensemble, written by "
                                 f"transferset {_s(m.tool_version)} "
                                 f"(schema {m.schema_version}). Read it with `h5py` and `json` alone (docs/FORMAT.md); "
                                 "`manifest.json` is the authority, this card a summary of it.", ""]
    out += _teachers(m) + _source(m) + _hints(m) + _counts(m)
    out += ["## License", "", _s(license) if license else "Not stated: ask whoever shared this set.", ""]
    if citation:
        lines = [printable(line).replace("```", "'''") for line in citation.splitlines()]
        out += ["## Citation", "", "```", *lines, "```", ""]
    return "\n".join(out)


def write_card(root: str | os.PathLike, manifest: Manifest, keep_if_same: bool = False, **kw) -> Path:
    """Write ``root/README.md`` atomically from ``manifest`` (keyword arguments as :func:`render_card`);
    ``keep_if_same``: leave a card that already holds these bytes as it is (no rewrite, no fsync)."""
    path = Path(root) / CARD_NAME
    for key in ("license", "citation"):  # what label recorded in the manifest, unless given here
        if kw.get(key) is None and isinstance(manifest.extra.get(key), str):
            kw[key] = manifest.extra[key]
    data = render_card(manifest, **kw).encode("utf-8")
    if not (keep_if_same and _holds(path, data)):
        atomic_write_bytes(path, data)
    return path


def _holds(path: Path, data: bytes) -> bool:
    """Whether ``path`` is a regular file of exactly ``data`` (read no further than its length)."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != len(data):
            return False
        with open(path, "rb") as f:
            return f.read(len(data) + 1) == data
    except OSError:
        return False
