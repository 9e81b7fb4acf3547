"""Specialists (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", section 5).

A generalist is helped by specialists, each trained on a cluster of classes the teachers confuse, with one
*dustbin* class for every other class. With a transfer set on disk a specialist costs no new labelling: its
targets are the stored distributions *folded* (the cluster's classes kept, the rest summed into the dustbin).

- :func:`make_plan`: the clusters, from the stored soft targets at one temperature: the covariance of the
  ensemble's predictions over the rows, k-means on its columns (each class is the column of its covariances
  with every class, so classes the teachers put mass on together fall together), and the rows each specialist
  would train on: those whose teachers put at least ``mass`` on the cluster, plus ``others`` times as many rows
  drawn (seeded) from the rest, as the paper's half-special, half-random training sets.
- folding: :func:`fold_log_probs` (dense), :func:`fold_topk` (kept classes and the tail, the tail spread evenly
  over the classes not kept, as ``recode`` decodes it), :func:`fold_counts` (sample and systematic draws) and
  :func:`fold_labels`.
- :func:`specialist_setup`: what ``train-student --specialist plan.json:I`` trains on (in memory): the selected
  rows, their folded targets at the training temperature and folded hard labels; ``k + 1`` outputs.

The plan also records, per cluster, the shift of the dustbin's logit that undoes the oversampling of the
cluster's rows (the paper: "incrementing the logit of the dustbin class by the log of the proportion by which the
specialist class is oversampled"): ``log(d / (1 - d)) - log(d' / (1 - d'))`` with ``d`` the mean dustbin mass
over every row and ``d'`` over the specialist's rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import TransferSetError

__all__ = ["PLAN_KIND", "predictions", "class_covariance", "kmeans_columns", "select_rows", "make_plan",
           "write_plan", "read_plan", "parse_specialist", "fold_log_probs", "fold_topk", "fold_counts",
           "fold_labels", "temper_log_probs", "SpecialistData", "specialist_setup", "plan_summary"]

PLAN_KIND = "transferset-specialist-plan"
_PLAN_VERSION = 1


# -- the ensemble's predictions (numpy) -------------------------------------------------------------------------
def predictions(root: str | os.PathLike, temperature: float | None = None):
    """``(probs [N, C] float32, labels [N] int64, manifest, temperature)``: the ensemble's combined
    distribution per row.

    Read from the stored soft targets at ``temperature`` (default: the lowest stored one): dense sets exactly;
    ``topk:K`` sets with the tail mass spread evenly over the classes not kept; ``sample:K`` and
    ``systematic:K`` sets as ``count / K``.
    """
    from ..format.schema import parse_codec
    from .reader import ReadSpec, load_in_memory

    root = Path(root)
    m = ReadSpec.open(root, ("labels",), None).manifest
    if not m.complete:
        raise TransferSetError(f"{root}: the transfer set is incomplete ({m.rows} of {m.expected_rows} rows)")
    temps = [float(t) for t in m.temperatures]
    t = min(temps) if temperature is None else float(temperature)
    family, _ = parse_codec(m.codec)
    fields = {"dense": ("soft_targets",), "topk": ("topk_index", "topk_log_probs", "tail_log_mass"),
              "sample": ("sample_index", "sample_count")}[family]
    got = load_in_memory(root, (*fields, "labels"), t)
    c = m.num_classes
    if family == "dense":
        probs = np.exp(got["soft_targets"].numpy().astype(np.float32))
    elif family == "topk":
        idx, lp, tail = (got[f].numpy() for f in fields)
        k = idx.shape[1]
        rest = np.exp(tail.astype(np.float64)) / max(c - k, 1)
        probs = np.repeat(rest[:, None].astype(np.float32), c, axis=1)
        np.put_along_axis(probs, idx.astype(np.int64), np.exp(lp).astype(np.float32), axis=1)
    else:
        idx, cnt = (got[f].numpy() for f in fields)
        probs = np.zeros((len(idx), c), np.float32)
        w = cnt.astype(np.float32) / np.maximum(cnt.sum(axis=1, keepdims=True), 1)
        np.add.at(probs, (np.repeat(np.arange(len(idx)), idx.shape[1]), idx.reshape(-1).astype(np.int64)),
                  w.reshape(-1))
    skipped = m.skipped_rows()  # a photo set's rows of files that could not be decoded: no prediction, never chosen
    if len(skipped):
        probs[skipped] = np.nan
    return probs, got["labels"].numpy().astype(np.int64), m, t


def class_covariance(probs: np.ndarray, block: int = 8192) -> np.ndarray:
    """The [C, C] covariance over rows of the predicted distributions ``probs`` [N, C] (float64, in blocks); rows
    of NaN (no prediction) are left out."""
    total, c = probs.shape
    valid = ~np.isnan(probs[:, 0]) if total else np.zeros(0, bool)
    n = int(valid.sum())
    if n < 2:
        raise TransferSetError(f"a covariance needs at least 2 rows, the set has {n}")
    mean = np.zeros(c)
    for s in range(0, total, block):
        mean += probs[s:s + block][valid[s:s + block]].sum(axis=0, dtype=np.float64)
    mean /= n
    acc = np.zeros((c, c))
    for s in range(0, total, block):
        x = probs[s:s + block][valid[s:s + block]].astype(np.float64) - mean
        acc += x.T @ x
    return acc / (n - 1)


def kmeans_columns(cov: np.ndarray, count: int, seed: int = 0, iterations: int = 100, restarts: int = 10) -> np.ndarray:
    """Cluster of each class [C]: k-means on the columns of ``cov``, the best (least within-cluster squared
    distance) of ``restarts`` runs, each a k-means++ start and Lloyd steps (as scikit-learn's ``n_init``).

    Deterministic for a seed; an emptied cluster is re-seeded with the class farthest from its centre.
    """
    x = np.asarray(cov, dtype=np.float64).T
    c = len(x)
    if not 1 <= count <= c:
        raise TransferSetError(f"must be between 1 and the number of classes ({c}), got {count}", option="count")
    best, best_cost = None, np.inf
    for r in range(restarts):
        assign, cost = _lloyd(x, count, np.random.default_rng([seed, r]), iterations)
        if cost < best_cost - 1e-12:
            best, best_cost = assign, cost
    return best


def _lloyd(x: np.ndarray, count: int, rng: np.random.Generator, iterations: int) -> tuple[np.ndarray, float]:
    c = len(x)
    centres = [x[rng.integers(c)]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, count):
        pick = rng.choice(c, p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(c)
        centres.append(x[pick])
        d2 = np.minimum(d2, ((x - x[pick]) ** 2).sum(1))
    centres = np.array(centres)
    assign = np.full(c, -1)
    sq = (x ** 2).sum(1)
    for _ in range(iterations):
        dist = sq[:, None] - 2 * x @ centres.T + (centres ** 2).sum(1)[None, :]
        new = dist.argmin(1)
        for j in range(count):
            if not (new == j).any():  # an empty cluster takes the class farthest from its own centre
                far = dist[np.arange(c), new].argmax()
                new[far] = j
        if (new == assign).all():
            break
        assign = new
        centres = np.array([x[assign == j].mean(0) for j in range(count)])
    cost = float(((x - centres[assign]) ** 2).sum())
    return assign, cost


def select_rows(cluster_mass: np.ndarray, mass: float, others: float, seed: int, index: int) -> np.ndarray:
    """Sorted rows a specialist trains on: every row with ``cluster_mass >= mass``, plus ``others`` times as
    many rows drawn without replacement (seeded by ``seed`` and the cluster ``index``) from the rest (a NaN mass,
    a row with no prediction, is neither)."""
    special = np.flatnonzero(cluster_mass >= mass)
    rest = np.flatnonzero(cluster_mass < mass)
    take = min(len(rest), int(round(others * len(special))))
    drawn = np.random.default_rng([seed, index]).permutation(rest)[:take] if take else rest[:0]
    return np.sort(np.concatenate([special, drawn]))


def _rows_hash(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype="<i8").tobytes()).hexdigest()


def _dustbin_shift(cluster_mass: np.ndarray, rows: np.ndarray) -> float:
    eps = 1e-6
    d = float(np.clip(1.0 - np.nanmean(cluster_mass), eps, 1 - eps))  # NaN: a row with no prediction
    d_sel = float(np.clip(1.0 - cluster_mass[rows].mean(), eps, 1 - eps)) if len(rows) else d
    return math.log(d / (1 - d)) - math.log(d_sel / (1 - d_sel))


def _cluster_temperature(root, temperature: float | None) -> float:
    """The given temperature, else the stored one nearest 8: at T = 1 confident teachers give a covariance whose
    diagonal dominates and k-means makes one giant cluster (1,000 classes, 97% teachers: 980 of 1,000 classes in
    one cluster at T = 2, clusters of 57 to 162 classes at T = 8; docs/RESULTS.md)."""
    if temperature is not None:
        return float(temperature)
    from ..format.parts import read_manifest

    temps = [float(t) for t in read_manifest(Path(root)).temperatures]
    return min(temps, key=lambda t: (abs(math.log(t / 8.0)), t))


# -- the plan ---------------------------------------------------------------------------------------------------
def make_plan(root: str | os.PathLike, count: int, *, min_size: int = 2, temperature: float | None = None,
              mass: float = 0.1, others: float = 1.0, seed: int = 0) -> dict:
    """The specialists' plan of a transfer set (a JSON-ready dict; see the module docstring).

    Args:
        root: the transfer-set folder.
        count: k-means clusters.
        min_size: clusters with fewer classes get no specialist (their classes stay the generalist's alone).
        temperature: the stored temperature whose predictions are clustered (default: the stored one nearest 8).
        mass: a row is a specialist's own when its teachers put at least this mass on the cluster (at the
            lowest stored temperature, the plan's ``select_temperature``).
        others: rows drawn from the rest, as a multiple of the specialist's own rows.
        seed: seed of k-means and of the drawn rows.
    """
    from ..format.manifest import manifest_hash

    checks = [("count", isinstance(count, int) and count >= 1, f"must be >= 1, got {count}"),
              ("min_size", isinstance(min_size, int) and min_size >= 1, f"must be >= 1, got {min_size}"),
              ("mass", math.isfinite(mass) and 0 < mass <= 1, f"must be in (0, 1], got {mass}"),
              ("others", math.isfinite(others) and others >= 0, f"must be >= 0, got {others}"),
              ("seed", isinstance(seed, int) and seed >= 0, f"must be >= 0, got {seed}")]
    for option, ok, message in checks:
        if not ok:
            raise TransferSetError(message, option=option)
    probs, labels, m, t = predictions(root, _cluster_temperature(root, temperature))
    c = probs.shape[1]
    assign = kmeans_columns(class_covariance(probs), count, seed)
    probs, _, _, t_select = predictions(root, None)  # rows are selected by the predictions at the lowest T
    clusters, uncovered = [], []
    for j in range(count):
        classes = np.flatnonzero(assign == j)
        if len(classes) < min_size:
            uncovered += classes.tolist()
            continue
        cm = probs[:, classes].sum(1, dtype=np.float64)
        rows = select_rows(cm, mass, others, seed, len(clusters))
        own = int((cm >= mass).sum())
        clusters.append({"classes": classes.tolist(), "rows": int(len(rows)), "own_rows": own,
                         "drawn_rows": int(len(rows)) - own,
                         "labelled_rows": int(np.isin(labels[rows], classes).sum()),
                         "rows_sha256": _rows_hash(rows), "dustbin_shift": _dustbin_shift(cm, rows)})
    return {"kind": PLAN_KIND, "version": _PLAN_VERSION, "transfer_set": str(root),
            "manifest_hash": manifest_hash(m), "num_classes": c, "rows": int(len(probs)),
            "codec": m.codec, "temperature": t, "select_temperature": t_select, "count": count, "min_size": min_size,
            "mass": mass, "others": others, "seed": seed, "clusters": clusters, "uncovered_classes": sorted(uncovered),
            "class_names": m.class_names}


def write_plan(plan: dict, path: str | os.PathLike) -> None:
    """Write ``plan`` as JSON, atomically."""
    from .._io import atomic_write_json

    atomic_write_json(Path(path), plan)


def read_plan(path: str | os.PathLike) -> dict:
    """Read and check a plan written by :func:`write_plan` (a plan is data: only its values are used)."""
    p = Path(path)
    try:
        plan = json.loads(p.read_text())
    except FileNotFoundError:
        raise TransferSetError(f"{p}: no such plan file", option="plan") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TransferSetError(f"{p}: not a specialist plan ({str(e)[:120]})", option="plan") from None
    if not isinstance(plan, dict) or plan.get("kind") != PLAN_KIND or plan.get("version") != _PLAN_VERSION:
        raise TransferSetError(f"{p}: not a specialist plan (write one with `transferset specialists plan`)",
                               option="plan")
    c = plan.get("num_classes")
    ok = isinstance(c, int) and c >= 2 and isinstance(plan.get("clusters"), list)
    for cl in plan.get("clusters") or []:
        classes = cl.get("classes") if isinstance(cl, dict) else None
        ok = ok and isinstance(classes, list) and len(classes) >= 1 and all(
            isinstance(v, int) and 0 <= v < c for v in classes) and len(set(classes)) == len(classes) \
            and isinstance(cl.get("dustbin_shift"), (int, float)) and math.isfinite(cl["dustbin_shift"])
    if not ok:
        raise TransferSetError(f"{p}: a damaged specialist plan (classes must be distinct whole numbers below "
                               "num_classes); write it again", option="plan")
    return plan


def parse_specialist(spec: str) -> tuple[dict, int]:
    """``"plan.json:I"`` -> ``(plan, I)``, the plan read and checked, I a cluster of it."""
    path, sep, index = str(spec).rpartition(":")
    if not sep or not index.isdigit():
        raise TransferSetError(f"{spec!r}: give the plan and a cluster, PLAN.json:I (I from 0)", option="specialist")
    plan = read_plan(path)
    i = int(index)
    if i >= len(plan["clusters"]):
        raise TransferSetError(f"{spec!r}: the plan has {len(plan['clusters'])} clusters (0 to "
                               f"{len(plan['clusters']) - 1})", option="specialist")
    return plan, i


def plan_summary(plan: dict) -> list[str]:
    """Lines for a terminal, ``info``-style: the plan's settings, then one line per cluster."""
    names = plan.get("class_names")

    def label(c: int) -> str:
        return str(names[c]) if isinstance(names, list) and c < len(names) else str(c)

    sizes = [len(c["classes"]) for c in plan["clusters"]]
    lines = [f"{'transfer_set':>18}: {plan['transfer_set']}",
             f"{'rows':>18}: {plan['rows']}", f"{'num_classes':>18}: {plan['num_classes']}",
             f"{'temperature':>18}: {plan['temperature']:g} (clusters), {plan['select_temperature']:g} (rows)",
             f"{'clusters':>18}: {len(sizes)} specialists of {plan['count']} k-means clusters "
             f"(min size {plan['min_size']}); classes each {min(sizes, default=0)} to {max(sizes, default=0)}",
             f"{'uncovered':>18}: {len(plan['uncovered_classes'])} classes",
             f"{'rows per':>18}: teacher mass >= {plan['mass']:g} on the cluster, plus {plan['others']:g} x as many "
             "others"]
    for i, c in enumerate(plan["clusters"]):
        shown = ", ".join(label(v) for v in c["classes"][:8]) + (", ..." if len(c["classes"]) > 8 else "")
        lines.append(f"{i:>18}: {len(c['classes'])} classes ({shown}); {c['rows']} rows ({c['own_rows']} own, "
                     f"{c['drawn_rows']} drawn; {c['labelled_rows']} labelled in the cluster); dustbin shift "
                     f"{c['dustbin_shift']:+.3f}")
    return lines


# -- folding (torch) --------------------------------------------------------------------------------------------
def fold_log_probs(log_p, classes):
    """``[B, C]`` log-probabilities -> ``[B, k + 1]``: the ``k`` cluster classes, then the dustbin (the rest)."""
    import torch

    cls = torch.as_tensor(classes, dtype=torch.long, device=log_p.device)
    rest = log_p.index_fill(1, cls, float("-inf"))
    return torch.cat([log_p.index_select(1, cls), torch.logsumexp(rest, dim=1, keepdim=True)], dim=1)


def fold_topk(index, log_probs, tail, classes, num_classes: int):
    """A top-k row (kept ``index`` [B, K], their ``log_probs`` [B, K], ``tail`` log-mass [B]) folded to
    ``[B, k + 1]`` log-probabilities. The tail's mass is spread evenly over the ``C - K`` classes not kept
    (``recode``'s decoding), so a cluster class not kept gets ``tail / (C - K)`` and the dustbin the rest."""
    import torch

    b, k_kept = index.shape
    per = tail.double() - math.log(max(num_classes - k_kept, 1))
    dense = per[:, None].expand(b, num_classes).clone()
    dense.scatter_(1, index.long(), log_probs.double())
    return fold_log_probs(dense, classes).float()


def fold_counts(index, count, classes):
    """Sampled draws (``index`` [B, K] classes, ``count`` [B, K], 0 in unused slots) folded to ``[B, k + 1]``
    log-probabilities ``log(n / K)``: a cluster class's count, the dustbin's the sum of the others
    (``-inf`` where nothing was drawn; the loss counts those terms as 0). Still unbiased: ``E[n_j / K] = p_j``."""
    import torch

    cls = torch.as_tensor(classes, dtype=torch.long, device=index.device)
    lookup = torch.full((int(max(int(cls.max()), int(index.max()))) + 1,), len(cls), dtype=torch.long,
                        device=index.device)
    lookup[cls] = torch.arange(len(cls), device=index.device)
    slot = lookup[index.long()]
    c = count.double()
    out = torch.zeros(index.shape[0], len(cls) + 1, dtype=torch.float64, device=index.device)
    out.scatter_add_(1, slot, c)
    return torch.log(out / c.sum(1, keepdim=True).clamp_min(1.0)).float()


def temper_log_probs(log_p, temperature: float):
    """``softmax(log_p / T)`` as log-probabilities: a distribution raised to the power 1/T, renormalised (classes
    at ``-inf`` stay there)."""
    import torch

    return torch.log_softmax(log_p.double() / float(temperature), dim=1).float()


def fold_labels(labels, classes):
    """Hard labels folded: a cluster class -> its position, any other class -> ``k`` (the dustbin), -1 stays."""
    import torch

    cls = torch.as_tensor(classes, dtype=torch.long, device=labels.device)
    lab = labels.long()
    match = lab[:, None] == cls[None, :]
    pos = torch.where(match.any(1), match.float().argmax(1), torch.full_like(lab, len(cls)))
    return torch.where(lab >= 0, pos, lab)


# -- training data of one specialist ----------------------------------------------------------------------------
@dataclass
class SpecialistData:
    """What the trainer needs for ``--specialist``: the in-memory tensors, the class count and a record."""

    tensors: dict
    num_classes: int
    record: dict


def _check_plan_matches(plan: dict, root: Path, manifest) -> None:
    from ..format.manifest import manifest_hash

    if plan.get("manifest_hash") != manifest_hash(manifest):
        raise TransferSetError(f"the plan was made from another transfer set ({plan.get('transfer_set')}) than "
                               f"{root}; make a plan of this set with `transferset specialists plan`",
                               option="specialist")


def specialist_setup(spec: str, root: Path, manifest, temperature: float, alpha: float, combine: str | None,
                     device, *, memory_budget_mb: int = 2048, source_override=None) -> SpecialistData:
    """The selected rows of cluster I of ``spec`` (``plan.json:I``), with folded targets at ``temperature``.

    The targets are the *tempered fold*: the ensemble's distribution at T = 1 folded (the cluster's classes kept,
    the rest summed into the dustbin), then raised to the power 1/T and renormalised. Folding the distribution
    stored at T instead would put the tempered mass of every other class in the dustbin (900 classes of 1e-4 each
    hold 0.09 together at T = 1; at T = 4 each weighs 1e-4 ** (1/4) = 0.1 against at most 1 for the top class, so
    together they hold almost all the mass), and a specialist trained on it predicts far too much dustbin at
    T = 1, where it is used. With the tempered fold its T = 1 output is taught the T = 1 fold, and
    the soft term at T still shows it the relative probabilities of the cluster's classes.

    Dense sets fold the stored soft targets at T = 1 (or the member logits combined at T = 1 when it is not stored
    or ``combine`` differs); sparse sets fold their kept classes and tail (top-k) or their draws (sample,
    systematic) at a stored T = 1.
    """
    plan, i = parse_specialist(spec)
    _check_plan_matches(plan, root, manifest)
    cluster = plan["clusters"][i]
    classes = cluster["classes"]
    rows = _specialist_rows(spec, root, plan, i)
    fields, stored, rule = _fold_fields(manifest, alpha, combine)
    got = _selected_rows(root, manifest, fields, stored, rows, memory_budget_mb, source_override)
    out = {"inputs": got["inputs"], "labels": fold_labels(got["labels"], classes), "index": got["index"]}
    targets = _folded_targets(got, classes, manifest, rule)
    if targets is not None:
        out["soft_targets"] = targets if temperature == _FOLD_T else temper_log_probs(targets, temperature)
    out = {k: v.to(device) for k, v in out.items()}
    record = {"fold": "tempered", "plan_manifest_hash": plan["manifest_hash"], "index": i, "classes": classes,
              "rows": int(len(rows)), "dustbin_shift": cluster["dustbin_shift"], "rows_sha256": cluster["rows_sha256"]}
    return SpecialistData(out, len(classes) + 1, record)


_FOLD_T = 1.0  #: specialists' targets are folded at T = 1 and tempered afterwards (specialist_setup says why)


def _specialist_rows(spec: str, root: Path, plan: dict, i: int) -> np.ndarray:
    """The rows of cluster ``i``, selected again from the set; refused when they are not the plan's."""
    cluster = plan["clusters"][i]
    probs = predictions(root, plan["select_temperature"])[0]
    cm = probs[:, cluster["classes"]].sum(1, dtype=np.float64)
    del probs
    rows = select_rows(cm, plan["mass"], plan["others"], plan["seed"], i)
    if _rows_hash(rows) != cluster["rows_sha256"]:
        raise TransferSetError(f"{spec}: the rows selected now differ from the plan's; make the plan again",
                               option="specialist")
    return rows


def _fold_fields(manifest, alpha: float, combine: str | None) -> tuple[tuple[str, ...], bool, str]:
    """``(fields read, whether T = 1 is stored, combination rule)``: what folding this set's targets needs."""
    from ..format.schema import parse_codec

    family, _ = parse_codec(manifest.codec)
    stored = manifest.temperature_index(_FOLD_T) is not None
    rule = combine or manifest.combine
    if alpha == 0:
        return ("inputs", "labels"), stored, rule
    if family == "dense":
        return ("inputs", "soft_targets" if stored and rule == manifest.combine else "logits", "labels"), stored, rule
    if not stored:
        raise TransferSetError(f"a specialist folds the targets at T = 1, which this {manifest.codec} set does not "
                               f"store (stored: {', '.join(f'{t:g}' for t in manifest.temperatures)}); label it with "
                               "T = 1 among its temperatures", option="temperature")
    return ("inputs", *{"topk": ("topk_index", "topk_log_probs", "tail_log_mass"),
                        "sample": ("sample_index", "sample_count")}[family], "labels"), stored, rule


def _selected_rows(root: Path, manifest, fields: tuple[str, ...], stored: bool, rows: np.ndarray,
                   memory_budget_mb: int, source_override) -> dict:
    """``fields`` of ``rows`` (and their index), read into memory within the budget."""
    import torch

    from .reader import estimate_bytes, load_in_memory

    need = estimate_bytes(manifest, fields, _FOLD_T if stored else None)
    if need > memory_budget_mb * (1 << 20):
        raise TransferSetError(f"a specialist trains in memory and reading this set takes about {need >> 20} MB, "
                               f"over the budget of {memory_budget_mb} MB; raise --memory-budget-mb",
                               option="memory_budget_mb")
    got = load_in_memory(root, fields, _FOLD_T if stored else None, source_override=source_override)
    sel = torch.from_numpy(rows)
    return {k: v.index_select(0, sel) for k, v in got.items()}


def _folded_targets(got: dict, classes: list[int], manifest, rule: str):
    """The fold at T = 1 (log-probabilities over the cluster's classes and the dustbin) of what ``got`` holds, or
    None when it holds no targets (alpha 0)."""
    import torch

    from .losses import teacher_log_probs

    if "soft_targets" in got:
        return fold_log_probs(got["soft_targets"].float(), classes)
    if "logits" in got:
        w = torch.tensor(manifest.weights, dtype=torch.float32)
        return fold_log_probs(teacher_log_probs(got["logits"].float(), _FOLD_T, rule, w), classes)
    if "topk_index" in got:
        return fold_topk(got["topk_index"], got["topk_log_probs"], got["tail_log_mass"], classes, manifest.num_classes)
    if "sample_index" in got:
        return fold_counts(got["sample_index"], got["sample_count"], classes)
    return None
