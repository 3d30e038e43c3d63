"""Labellers for the active-learning tests: real GFN2-xTB (``tblite``) with one scripted misbehaviour each,
given to the loop by import path (``tests.al_labellers:...``) as a user's own calculator would be."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
from ase.calculators.calculator import Calculator, all_changes


class _XTB(Calculator):
    implemented_properties = ["energy", "forces"]

    def __init__(self, **kwargs):
        super().__init__()
        from tblite.ase import TBLite

        self.inner = TBLite(method="GFN2-xTB", verbosity=0, **kwargs)

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms.copy()
        a.calc = self.inner
        self.results = {"energy": a.get_potential_energy(), "forces": a.get_forces()}


class RaisingXTB(_XTB):
    """Raises on structures whose first atom's x coordinate rounds to an odd number of 0.01 Å
    (deterministic, about half of them)."""

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        if int(round(atoms.positions[0, 0] * 100)) % 2:
            raise RuntimeError("SCF did not converge (scripted)")
        super().calculate(atoms, properties, system_changes)


class KillingXTB(_XTB):
    """SIGKILLs its own process on its second structure while the file named by ``E2IP_TEST_KILL_FILE``
    exists (the file is removed first, so the resumed run labels normally)."""

    calls = 0

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        KillingXTB.calls += 1
        marker = os.environ.get("E2IP_TEST_KILL_FILE")
        if KillingXTB.calls == 2 and marker and Path(marker).is_file():
            Path(marker).unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        super().calculate(atoms, properties, system_changes)
