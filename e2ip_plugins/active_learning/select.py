"""Selection of structures to label (the committee selector's calculator is :mod:`e2ip_plugins.committee`).

Score of a candidate frame: the per-structure max u = max_i sqrt(tr U_i / 3) (eV/Å) of the exploring
calculator — the e²IP epistemic covariance (selector ``e2ip``) or the committee's 3×3 sample covariance
U_i = 1/(K−1) Σ_k (F_ik − F̄_i)(F_ik − F̄_i)ᵀ (selector ``committee``). Frames with
trust_lo ≤ score < trust_hi are candidates; they are taken in decreasing score (``select.order:
uncertainty``), in a seeded random order (``random``, DP-GEN's choice) or greedily by score times
distance to what is already labelled (``diverse``, below), skipping any frame closer than
``min_distance`` to one already taken, until the budget is met. Selector ``random``
draws candidates uniformly from all explored frames (no band) with the same duplicate rule.

``select.stratify: start`` (or ``run``) spreads the budget over the exploration starts (or over the MD runs,
start × temperature), as DP-GEN caps its labels per system (``fp_task_max``): each stratum's candidates
keep the order above, and the strata are visited round-robin — the first of every stratum, then the
second, … — beginning with the stratum whose first candidate comes first in that order. A stratum that
runs out leaves its share to the others, so the budget is still spent whenever there are enough candidates.
Without it one uncertain trajectory can take the whole budget in near-consecutive frames.

``diverse`` (uncertainty-weighted farthest-point batch selection): with R = the labelled training
frames plus the frames picked so far, the next frame is

    argmax_i  s_i · m_i,   m_i = min_{r ∈ R} D(i, r)

(s_i its score, D the duplicate distance below; a composition absent from R counts as infinitely far, ties
then by score). Both factors carry units, so the product has no tuning constant: rescaling u or D does
not change the choice. It spends the budget on uncertain frames that are also far from the training set
and from each other, instead of on many near-copies of one uncertain region.

Duplicate descriptor: the sorted vector of all interatomic distances d(A) (invariant to rotation,
translation and permutation of like atoms), distance D(A, B) = sqrt(mean_k (d_k(A) − d_k(B))²) in Å;
frames with different compositions are never duplicates.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
from e2ip_plugins.committee import CommitteeCalculator  # noqa: F401  (the committee selector's calculator)


def descriptor(atoms) -> np.ndarray:
    """Sorted interatomic distances (Å), minimum-image for periodic cells."""
    n = len(atoms)
    if n < 2:
        return np.zeros(0)
    d = atoms.get_all_distances(mic=bool(np.any(atoms.pbc)))
    return np.sort(d[np.triu_indices(n, 1)])


def _rms(da: np.ndarray, db: np.ndarray) -> float:
    """D between two descriptors of the same composition (0 for single atoms)."""
    return float(np.sqrt(np.mean((da - db) ** 2))) if da.size else 0.0


def descriptor_distance(a, b) -> float:
    """D(A, B) of the module docstring (inf for different compositions)."""
    if _composition(a) != _composition(b):
        return float("inf")
    return _rms(descriptor(a), descriptor(b))


def select_frames(frames: Sequence, scores: np.ndarray, budget: int, min_distance: float, trust_lo: float,
                  trust_hi: float, random_seed: Optional[int] = None, band_order: str = "uncertainty",
                  band_seed: int = 0, reference: Sequence = (), groups: Optional[Sequence] = None) -> List[int]:
    """Indices of the frames to label (module docstring); ``random_seed`` set = the random selector (no band).

    ``band_order``: ``uncertainty`` takes the band's candidates by decreasing score; ``random`` in a seeded
    random order (``band_seed``; DP-GEN's uniform choice among its candidates); ``diverse`` greedily by
    score × distance to ``reference`` (the labelled frames) and to the frames already taken.
    ``groups`` (one hashable label per frame): stratified round-robin over the labels (module docstring).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if random_seed is None and band_order == "diverse":
        ok = np.flatnonzero((scores >= trust_lo) & (scores < trust_hi) & np.isfinite(scores))
        return _diverse(frames, scores, ok, budget, min_distance, reference)
    if random_seed is None:
        ok = np.flatnonzero((scores >= trust_lo) & (scores < trust_hi) & np.isfinite(scores))
        if band_order == "random":
            order = ok[np.random.default_rng(band_seed).permutation(len(ok))]
        else:
            order = ok[np.argsort(-scores[ok], kind="stable")]
    else:
        order = np.random.default_rng(random_seed).permutation(len(frames))
    if groups is not None:
        order = round_robin(order, groups)
    taken: List[int] = []
    descs: List[np.ndarray] = []
    comps: List[tuple] = []
    for i in order:
        if len(taken) >= budget:
            break
        d = descriptor(frames[i])
        comp = _composition(frames[i])
        dup = any(c == comp and _rms(d, e) < min_distance for c, e in zip(comps, descs))
        if not dup:
            taken.append(int(i))
            descs.append(d)
            comps.append(comp)
    return taken


def round_robin(order: Sequence[int], groups: Sequence) -> np.ndarray:
    """``order`` interleaved over ``groups``: the first of every group, then the second, …; the groups by the
    position of their first member in ``order``, each keeping its members' relative order."""
    lists: Dict = {}
    for i in order:
        lists.setdefault(groups[int(i)], []).append(int(i))
    out: List[int] = []
    queues = list(lists.values())
    for rank in range(max((len(q) for q in queues), default=0)):
        out.extend(q[rank] for q in queues if rank < len(q))
    return np.array(out, dtype=np.int64)


def _composition(atoms) -> tuple:
    return tuple(sorted(atoms.get_atomic_numbers().tolist()))


def _diverse(frames: Sequence, scores: np.ndarray, ok: np.ndarray, budget: int, min_distance: float,
             reference: Sequence) -> List[int]:
    """Greedy argmax_i s_i·m_i over the candidates ``ok`` (module docstring), duplicates (m_i < min_distance)
    never taken; O(candidates × (references + budget)) descriptor distances."""
    comps = [_composition(frames[i]) for i in ok]
    descs = np.array([descriptor(frames[i]) for i in ok], dtype=object)
    m = np.full(len(ok), np.inf)

    def shrink(desc: np.ndarray, comp: tuple) -> None:
        for j, (c, d) in enumerate(zip(comps, descs)):
            if c == comp:
                m[j] = min(m[j], _rms(d, desc))

    for r in reference:
        shrink(descriptor(r), _composition(r))
    taken: List[int] = []
    free = np.ones(len(ok), dtype=bool)
    s = scores[ok]
    while len(taken) < budget:
        alive = free & (m >= min_distance)
        if not alive.any():
            break
        inf = alive & np.isinf(m)
        pool = inf if inf.any() else alive
        key = np.where(pool, s if inf.any() else s * m, -np.inf)
        j = int(np.argmax(key))
        taken.append(int(ok[j]))
        free[j] = False
        shrink(descs[j], comps[j])
    return taken


def frame_scores(frames: Sequence) -> np.ndarray:
    """``forces_uncertainty_max`` of frames written by the MD monitor."""
    return np.array([float(a.info["forces_uncertainty_max"]) for a in frames], dtype=np.float64)


def band_counts(scores: np.ndarray, trust_lo: float, trust_hi: float) -> Dict[str, int]:
    """How many frames fall in each trust band."""
    s = np.asarray(scores)
    return {"accurate": int((s < trust_lo).sum()), "candidate": int(((s >= trust_lo) & (s < trust_hi)).sum()),
            "stop": int((s >= trust_hi).sum())}
