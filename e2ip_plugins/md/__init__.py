"""MD tools on ASE calculators (DESIGN §6; issue 13): trust-band monitor, uncertainty-driven dynamics,
the ``e2ip-md`` command. Framework-agnostic: models are reached through ASE calculators, opened by the
adapter that claims the file's suffix in the ``e2ip.calculators`` entry-point group (:mod:`.registry`).

- :mod:`.monitor` — :class:`UncertaintyMonitor` (ASE observer), :class:`TrustBandExceeded`;
- :mod:`.udd` — :class:`UDDCalculator`: E_bias = A[exp(−σ²/(N B²)) − 1] and its autograd force;
- :mod:`.registry` — :func:`open_calculator`, :func:`find_adapter`, the adapter protocol;
- :mod:`.cli` — ``e2ip-md``.
"""

from .monitor import ACCURATE, CANDIDATE, STOP, TrustBandExceeded, UncertaintyMonitor, band_of, max_u_statistic
from .registry import MDConfigError, UDDUnsupportedError, find_adapter, open_calculator, variance_function_for
from .udd import UDDCalculator, bias_energy, bias_forces, epistemic_variance_from_results

__all__ = [
    "ACCURATE", "CANDIDATE", "STOP", "MDConfigError", "TrustBandExceeded", "UDDCalculator", "UDDUnsupportedError",
    "UncertaintyMonitor", "band_of", "bias_energy", "bias_forces", "epistemic_variance_from_results", "find_adapter",
    "max_u_statistic", "open_calculator", "variance_function_for",
]
