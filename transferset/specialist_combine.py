"""A generalist and its specialists combined at test time (Hinton, Vinyals & Dean 2015, section 5.4).

For each test case the specialists whose classes meet the generalist's ``top`` most probable classes are
*active*; the combined distribution ``q`` over all classes minimises

    ``KL(p_g || q) + sum_{m active} KL(p_m || q_m)``

where ``p_g`` is the generalist's distribution, ``p_m`` specialist m's over its ``k_m`` classes and its dustbin,
and ``q_m`` is ``q`` folded the same way (its classes kept, the rest summed into the dustbin). As in the paper,
``q`` is found by gradient-based minimisation over its logits (L-BFGS here, the cases that share their active
specialists at once: the objective is a sum of one independent convex problem per case). A case with no active
specialist keeps ``p_g``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import TransferSetError

__all__ = ["active_specialists", "combined_objective", "kl_combine", "evaluate_specialists", "specialist_predictions",
           "combine_and_score", "active_table", "em_combine", "scatter_matrix", "export_combined_onnx"]


def active_specialists(log_p_g: np.ndarray, clusters: Sequence[Sequence[int]], top: int = 1) -> np.ndarray:
    """``[N, M]`` bool: specialist m is active for case i when one of its classes is among the generalist's
    ``top`` most probable classes of case i."""
    n, c = log_p_g.shape
    top = max(1, min(int(top), c))
    best = np.argpartition(-log_p_g, top - 1, axis=1)[:, :top]
    member = np.zeros((len(clusters), c), bool)
    for m, cl in enumerate(clusters):
        member[m, list(cl)] = True
    return member[:, best].any(axis=2).T if len(clusters) else np.zeros((n, 0), bool)


def combined_objective(z, log_p_g, pair_rows, pair_member, pair_target):
    """The summed KL (up to the targets' entropies) at logits ``z`` [N, C] (torch; differentiable).

    ``pair_member`` [P, C] bool marks the classes of the specialist of each (case, specialist) pair,
    ``pair_target`` [P, C + 1] holds its log-probabilities scattered to the classes, with the dustbin last
    (``-inf`` elsewhere).
    """
    import torch

    log_q = torch.log_softmax(z, dim=1)
    loss = -(log_p_g.exp() * log_q).sum()
    if len(pair_rows):
        lq = log_q[pair_rows]
        dust = torch.logsumexp(lq.masked_fill(pair_member, float("-inf")), dim=1)
        kept = torch.where(pair_member, lq, torch.zeros_like(lq))
        p = pair_target.exp()
        loss = loss - (p[:, :-1] * kept).sum() - (p[:, -1] * dust).sum()
    return loss


def kl_combine(log_p_g: np.ndarray, specialist_log_probs: Sequence[np.ndarray], clusters: Sequence[Sequence[int]],
               active: np.ndarray, *, max_iter: int = 200, tolerance: float = 1e-9) -> np.ndarray:
    """Log-probabilities [N, C] of the combined ``q`` (see the module docstring).

    Cases are solved in groups that share their active specialists. Within a group only the classes of those
    specialists (their union U) and one bin for every other class are variables: a class outside U enters the
    objective through ``KL(p_g || q)`` and through dustbins that hold all such classes alike, so at the minimum
    ``q_c`` is proportional to ``p_g(c)`` there, and the bin's mass is shared out that way. The result is the
    minimum over all C classes, found on ``|U| + 1`` of them.

    Args:
        log_p_g: the generalist's log-probabilities [N, C].
        specialist_log_probs: per specialist m, [N, k_m + 1] log-probabilities (its classes, then its dustbin).
        clusters: per specialist, its ``k_m`` classes in its output order.
        active: [N, M] bool, from :func:`active_specialists`.
        max_iter: L-BFGS iterations per group.
        tolerance: stop when the gradient's largest entry falls below this.
    """
    out = np.array(log_p_g, dtype=np.float64, copy=True)
    if active.size == 0:
        return out
    keys, group = np.unique(active, axis=0, return_inverse=True)
    for g, key in enumerate(keys):
        on = np.flatnonzero(key)
        if not len(on):
            continue
        rows = np.flatnonzero(group.reshape(-1) == g)
        out[rows] = _solve_group(out[rows], [np.asarray(specialist_log_probs[m], np.float64)[rows] for m in on],
                                 [list(clusters[m]) for m in on], max_iter, tolerance)
    return out


def _solve_group(log_p_g: np.ndarray, spec_lp: list, clusters: list, max_iter: int, tolerance: float) -> np.ndarray:
    """The combination for cases sharing the active specialists ``clusters``, on their union plus one bin."""
    import torch

    n, c = log_p_g.shape
    union = sorted(set().union(*map(set, clusters)))
    rest = np.ones(c, bool)
    rest[union] = False
    pos = {v: i for i, v in enumerate(union)}
    g = np.concatenate([log_p_g[:, union], _logsumexp(log_p_g[:, rest])[:, None]], axis=1)
    u = len(union) + 1
    member = np.zeros((len(clusters), u), bool)
    target = np.full((len(clusters), n, u + 1), -np.inf)
    for m, cl in enumerate(clusters):
        idx = [pos[v] for v in cl]
        member[m, idx] = True
        target[m][:, idx] = spec_lp[m][:, :-1]
        target[m][:, u] = spec_lp[m][:, -1]
    rows = torch.arange(n).repeat(len(clusters))
    args = (torch.from_numpy(g), rows, torch.from_numpy(np.repeat(member, n, axis=0)),
            torch.from_numpy(target.reshape(-1, u + 1)))
    z = torch.from_numpy(np.ascontiguousarray(g)).clone(memory_format=torch.contiguous_format).requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=max_iter, tolerance_grad=tolerance, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = combined_objective(z, *args)
        loss.backward()
        z.grad = z.grad.contiguous()  # L-BFGS views the gradient flat
        return loss

    opt.step(closure)
    lq = torch.log_softmax(z.detach(), dim=1).numpy()
    out = np.empty_like(log_p_g)
    out[:, union] = lq[:, :-1]
    if rest.any():  # the bin's mass shared out in proportion to p_g
        share = log_p_g[:, rest] - _logsumexp(log_p_g[:, rest])[:, None]
        out[:, rest] = lq[:, -1:] + share
    return out


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def active_table(y: np.ndarray, pred_g: np.ndarray, pred_c: np.ndarray, active: np.ndarray) -> list[dict]:
    """Rows of the paper's table 5, by number of active specialists: cases, correct before and after."""
    counts = active.sum(1)
    out = []
    for k in range(int(counts.max(initial=0)) + 1):
        sel = counts == k
        if not sel.any():
            continue
        g, c = int((pred_g[sel] == y[sel]).sum()), int((pred_c[sel] == y[sel]).sum())
        out.append({"active": k, "cases": int(sel.sum()), "generalist_correct": g, "combined_correct": c,
                    "delta": c - g, "relative_accuracy_change": (c - g) / g if g else 0.0})
    return out


def _specialist_file_check(path: Path, i: int, plan: dict, width: int) -> None:
    k = len(plan["clusters"][i]["classes"])
    if width != k + 1:
        raise TransferSetError(f"{path}: {width} outputs, but cluster {i} of the plan has {k} classes and a dustbin "
                               f"({k + 1}); give the specialists in the plan's order", option="specialists")
    if path.suffix in (".pt", ".pth"):
        import json

        import torch

        ck = torch.load(str(path), map_location="cpu", weights_only=True)
        rec = json.loads(ck["specialist"]) if isinstance(ck, dict) and "specialist" in ck else None
        if rec is None or rec.get("index") != i or rec.get("plan_manifest_hash") != plan["manifest_hash"]:
            raise TransferSetError(f"{path}: not the specialist of cluster {i} of this plan; give the specialists "
                                   "in the plan's order", option="specialists")


def evaluate_specialists(generalist: str | os.PathLike, specialists: Sequence[str | os.PathLike], plan_path,
                         data: str, labels: str | None = None, *, top: int = 1, dustbin_shift: bool = True,
                         batch_size: int = 1024, device: str = "auto", limit: int | None = None) -> dict:
    """The generalist alone and combined with its specialists (in the plan's order), on labelled ``data``.

    Returns accuracies, errors, the relative error reduction and :func:`active_table`'s rows.
    """
    plan, g, spec_lp, y = specialist_predictions(generalist, specialists, plan_path, data, labels,
                                                 batch_size=batch_size, device=device, limit=limit)
    res = combine_and_score(plan, g, spec_lp, y, top=top, dustbin_shift=dustbin_shift)
    return {"generalist": str(generalist), "specialists": [str(s) for s in specialists], **res}


def specialist_predictions(generalist, specialists, plan_path, data: str, labels: str | None = None, *,
                           batch_size: int = 1024, device: str = "auto", limit: int | None = None):
    """``(plan, generalist log-probs [N, C], per specialist [N, k_m + 1], labels [N])``, each model run once."""
    from .evaluate import predict_log_probs
    from .inputs.sources import open_source, read_labels
    from .training.specialists import read_plan

    plan = read_plan(plan_path)
    if len(specialists) > len(plan["clusters"]) or not specialists:
        raise TransferSetError(f"give 1 to {len(plan['clusters'])} specialists (the plan's clusters, in order), got "
                               f"{len(specialists)}", option="specialists")
    src = open_source(data, limit=limit)
    y = read_labels(labels, rows=src.rows) if labels else src.labels
    if y is None:
        raise TransferSetError(f"is needed: {data} carries no labels", option="labels")
    kw = dict(batch_size=batch_size, device=device)
    g = predict_log_probs([generalist], src, **kw)
    if g.shape[1] != plan["num_classes"]:
        raise TransferSetError(f"{generalist}: {g.shape[1]} classes, the plan's set has {plan['num_classes']}",
                               option="generalist")
    spec_lp = []
    for i, s in enumerate(specialists):
        lp = predict_log_probs([s], src, **kw).astype(np.float64)
        _specialist_file_check(Path(s), i, plan, lp.shape[1])
        spec_lp.append(lp)
    return plan, g, spec_lp, np.asarray(y, dtype=np.int64)


def combine_and_score(plan: dict, g: np.ndarray, spec_lp: Sequence[np.ndarray], y: np.ndarray, *, top: int = 1,
                      dustbin_shift: bool = True) -> dict:
    """Combine (each specialist's dustbin logit shifted by the plan's correction unless told not to) and score."""
    from .training.scoring import metrics

    shifted = []
    for i, lp in enumerate(spec_lp):
        lp = np.array(lp, dtype=np.float64, copy=True)
        if dustbin_shift:
            lp[:, -1] += plan["clusters"][i]["dustbin_shift"]
            lp -= np.logaddexp.reduce(lp, axis=1, keepdims=True)
        shifted.append(lp)
    clusters = [plan["clusters"][i]["classes"] for i in range(len(spec_lp))]
    active = active_specialists(g, clusters, top)
    q = kl_combine(g, shifted, clusters, active)
    mg, mc = metrics(g, y), metrics(q, y)
    pred_g, pred_c = g.argmax(1), q.argmax(1)
    return {"n": int(len(y)), "top": top, "dustbin_shift": dustbin_shift, "generalist_accuracy": mg["accuracy"],
            "combined_accuracy": mc["accuracy"], "generalist_errors": int((pred_g != y).sum()),
            "combined_errors": int((pred_c != y).sum()),
            "relative_error_reduction": float(1 - (pred_c != y).sum() / max((pred_g != y).sum(), 1)),
            "generalist_nll": mg["nll"], "combined_nll": mc["nll"],
            "by_active": active_table(y, pred_g, pred_c, active)}


#: EM steps the exported graph unrolls (``export_combined_onnx``); the test holds them against L-BFGS
EXPORT_ITERATIONS = 200


def em_combine(log_p_g, spec_log_probs, scatter, active, iterations: int = EXPORT_ITERATIONS):
    """:func:`kl_combine`'s minimum by EM in torch, every case and specialist at once, for a graph.

    ``log_p_g`` [N, C]; ``spec_log_probs`` [N, M, K + 1] (specialist m's classes padded to K, its dustbin last,
    padding -inf); ``scatter`` [M, K, C] (:func:`scatter_matrix`: specialist m's j-th output -> its class);
    ``active`` [N, M] float. Each step shares every active specialist's dustbin mass over the classes outside its
    cluster in proportion to q, then averages the generalist's and the specialists' completed distributions (the
    stationarity condition of the summed KL, so its fixed point is the minimum; tests/test_specialists.py holds
    it against L-BFGS). A case with no active specialist keeps ``p_g``. Returns log q [N, C].
    """
    import torch

    p_g = log_p_g.exp()
    outside = 1.0 - scatter.sum(1)  # [M, C]
    spec_p = spec_log_probs.exp()
    inside = torch.einsum("nmk,mkc->nc", spec_p[:, :, :-1] * active[:, :, None], scatter)
    dust = spec_p[:, :, -1] * active  # [N, M]
    denom = 1.0 + active.sum(1, keepdim=True)
    q = p_g
    for _ in range(iterations):
        ratio = dust / (q @ outside.T).clamp_min(1e-30)  # [N, M]
        q = (p_g + inside + q * (ratio @ outside)) / denom
    return torch.log(q.clamp_min(1e-38))


def scatter_matrix(clusters: Sequence[Sequence[int]], num_classes: int):
    """[M, K, C] float: 1 where specialist m's j-th output is class ``clusters[m][j]`` (K the largest cluster)."""
    import torch

    k = max((len(cl) for cl in clusters), default=0)
    out = torch.zeros(len(clusters), k, num_classes)
    for m, cl in enumerate(clusters):
        out[m, torch.arange(len(cl)), torch.tensor(list(cl), dtype=torch.long)] = 1.0
    return out


def _combined_members(generalist, specialists, plan_path) -> tuple[dict, list, list]:
    """The plan, the generalist's and the specialists' modules from their checkpoints (checked against the plan),
    and the specialists' clusters in the plan's order."""
    from .evaluate import load_student_checkpoint
    from .training.specialists import read_plan

    paths = [Path(generalist), *map(Path, specialists)]
    bad = [p for p in paths if p.suffix not in (".pt", ".pth")]
    if bad:
        raise TransferSetError(f"{bad[0]}: the combined graph is built from student checkpoints (student.pt), not "
                               "ONNX files", option="export_onnx")
    plan = read_plan(plan_path)
    models = [load_student_checkpoint(p, "cpu") for p in paths]
    for i, (p, mdl) in enumerate(zip(paths[1:], models[1:])):
        _specialist_file_check(p, i, plan, int(mdl.student_spec["num_classes"]))
    if int(models[0].student_spec["num_classes"]) != int(plan["num_classes"]):
        raise TransferSetError(f"{generalist}: {models[0].student_spec['num_classes']} classes, the plan's set has "
                               f"{plan['num_classes']}", option="generalist")
    return plan, models, [plan["clusters"][i]["classes"] for i in range(len(specialists))]


def export_combined_onnx(generalist: str | os.PathLike, specialists: Sequence[str | os.PathLike], plan_path,
                         out: str | os.PathLike, input_dtype: str, *, top: int = 1, dustbin_shift: bool = True,
                         iterations: int = EXPORT_ITERATIONS) -> Path:
    """The generalist, its specialists and their combination as one ONNX graph: ``input`` -> ``logits`` (log q).

    Needs student checkpoints (student.pt), whose modules are composed in torch and exported as one model; the
    combination is :func:`em_combine` unrolled ``iterations`` times, the specialists' activity the generalist's
    ``top`` classes, each dustbin logit shifted by the plan's correction unless ``dustbin_shift`` is False.
    """
    import torch
    from torch import nn

    from .training.students import export_onnx

    plan, models, clusters = _combined_members(generalist, specialists, plan_path)
    c = int(plan["num_classes"])
    scatter = scatter_matrix(clusters, c)
    member = scatter.sum(1)
    shift = torch.tensor([float(plan["clusters"][i]["dustbin_shift"]) if dustbin_shift else 0.0
                          for i in range(len(clusters))])
    width = scatter.shape[1]

    class Combined(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.generalist, self.specialists = models[0], nn.ModuleList(models[1:])
            self.register_buffer("member", member)
            self.register_buffer("scatter", scatter)
            self.register_buffer("shift", shift)

        def forward(self, x):
            log_p_g = torch.log_softmax(self.generalist(x).float(), dim=1)
            best = torch.topk(log_p_g, min(top, c), dim=1).indices  # [N, top]
            active = (self.member[:, best].amax(dim=2) > 0).T.float()  # [N, M]
            spec = []
            for m, s in enumerate(self.specialists):
                z = s(x).float()
                z = torch.cat([z[:, :-1], z[:, -1:] + self.shift[m]], dim=1)
                lp = torch.log_softmax(z, dim=1)
                kept = nn.functional.pad(lp[:, :-1], (0, width - (lp.shape[1] - 1)), value=float("-inf"))
                spec.append(torch.cat([kept, lp[:, -1:]], dim=1))
            return em_combine(log_p_g, torch.stack(spec, dim=1), self.scatter, active, iterations)

    model = Combined().eval()
    model.student_spec = models[0].student_spec
    export_onnx(model, out, models[0].student_spec["input_shape"], input_dtype)
    return Path(out)
