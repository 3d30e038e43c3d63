"""What the benchmark entry points share and are not themselves: backbones (:mod:`.backends`), data splits
(:mod:`.data`), profiles (:mod:`.profiles`), the pieces of ``benchmarks.run`` (:mod:`.runtime`,
:mod:`.training`, :mod:`.evaluation`, :mod:`.report`, :mod:`.report_tables`, :mod:`.plots`) and the
measurement processes that ``benchmarks.run`` and ``benchmarks.cost`` start (:mod:`.memprobe`,
:mod:`.cost_probe`, table in :mod:`.cost_report`)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"  # the development data (iso7_dev_*.xyz) beside the checkout
