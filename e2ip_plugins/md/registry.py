"""Find the adapter that opens a model file (DESIGN §6): the ``e2ip.calculators`` entry-point group.

The core never imports an adapter by name. Each adapter registers, in its distribution's metadata,
one entry point per file suffix it claims; the entry point's *name* is the suffix and its value an
object implementing :class:`CalculatorAdapter`::

    [project.entry-points."e2ip.calculators"]
    ".model"       = "mace_ext.md:ADAPTER"
    ".ckpt"        = "nequip_ext.md:ADAPTER"
    ".nequip.zip"  = "nequip_ext.md:ADAPTER"
    ".nequip.pt2"  = "nequip_ext.md:ADAPTER"

The longest claimed suffix that the file name ends with wins (``x.nequip.pt2`` → ``.nequip.pt2``),
so an unknown file type is rejected from the names alone, before any framework is imported.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Callable, Dict, Protocol, Tuple, Union, runtime_checkable

import numpy as np

GROUP = "e2ip.calculators"

#: σ² hook of an adapter: atoms → (σ² = Σ_i tr U_epi,i / 3 in (eV/Å)², ∂σ²/∂r as (N, 3) in (eV/Å)²/Å)
VarianceFn = Callable[["ase.Atoms"], Tuple[float, np.ndarray]]  # noqa: F821


class MDConfigError(ValueError):
    """Bad input to the MD tools (unknown model type, bad trust bands, bad UDD parameters, ...)."""


class UDDUnsupportedError(MDConfigError):
    """The model cannot give ∂σ²/∂r (e.g. a compiled model); the message names the eager alternative."""


@runtime_checkable
class CalculatorAdapter(Protocol):
    """What an adapter's entry point provides.

    ``open(path, device)`` returns an ASE calculator whose ``results`` hold the DESIGN §3 keys
    (at least ``forces``, ``forces_covariance`` (N,3,3), ``forces_uncertainty`` (N,)).
    ``variance_function(calc)`` returns the UDD hook σ²(r) and its gradient (see :data:`VarianceFn`)
    for a calculator this adapter opened, or raises :class:`UDDUnsupportedError`.
    """

    name: str

    def open(self, path: Union[str, Path], device: str = "cpu") -> "ase.calculators.calculator.Calculator":  # noqa: F821
        ...

    def variance_function(self, calc) -> VarianceFn:
        ...


def claimed_suffixes() -> Dict[str, importlib.metadata.EntryPoint]:
    """Suffix → entry point, for every adapter installed in this environment."""
    eps = importlib.metadata.entry_points(group=GROUP)
    return {ep.name: ep for ep in eps}


def match_suffix(path: Union[str, Path], suffixes) -> str:
    """The longest suffix in ``suffixes`` that the file name ends with; :class:`MDConfigError` if none."""
    name = Path(path).name
    hits = [s for s in suffixes if name.endswith(s) and len(name) > len(s)]
    if not hits:
        known = ", ".join(sorted(suffixes)) or "none (no adapter installed)"
        raise MDConfigError(
            f"unknown model file type: {name!r}; the installed adapters ({GROUP} entry points) open {known}"
        )
    return max(hits, key=len)


def find_adapter(path: Union[str, Path]) -> CalculatorAdapter:
    """The adapter that claims ``path``'s suffix, imported. :class:`MDConfigError` if none claims it or if
    its module cannot be imported here (e.g. a MACE model in the NequIP environment)."""
    eps = claimed_suffixes()
    suffix = match_suffix(path, eps)
    ep = eps[suffix]
    try:
        adapter = ep.load()
    except ImportError as err:
        raise MDConfigError(
            f"{Path(path).name!r} ({suffix}) is opened by {ep.value}, which cannot be imported in this environment "
            f"({err}); run from the environment of that framework"
        ) from err
    return adapter


def open_calculator(path: Union[str, Path], device: str = "cpu"):
    """Open ``path`` with the adapter its suffix selects (see :func:`find_adapter`)."""
    return find_adapter(path).open(path, device=device)


def variance_function_for(calc) -> VarianceFn:
    """Ask every installed adapter (that imports here) for the UDD hook of ``calc``.

    Adapters return ``None`` for calculators that are not theirs. :class:`UDDUnsupportedError` from
    the owning adapter propagates; :class:`MDConfigError` if no adapter recognises ``calc``.
    """
    seen = set()
    for ep in claimed_suffixes().values():
        if ep.value in seen:
            continue
        seen.add(ep.value)
        try:
            adapter = ep.load()
        except ImportError:
            continue
        fn = adapter.variance_function(calc)
        if fn is not None:
            return fn
    raise MDConfigError(
        f"no installed {GROUP} adapter gives the differentiable epistemic variance of a {type(calc).__name__}; "
        "pass variance_fn=... to UDDCalculator"
    )


__all__ = [
    "GROUP", "CalculatorAdapter", "MDConfigError", "UDDUnsupportedError", "VarianceFn", "claimed_suffixes",
    "find_adapter", "match_suffix", "open_calculator", "variance_function_for",
]
