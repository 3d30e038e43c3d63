"""Active learning with one e²IP model (issue 14; DESIGN §6): ``e2ip-active-learning``.

Framework-agnostic: training runs the framework's own CLI through the ``e2ip.trainers`` adapter of
the configured framework, models are reached through ASE calculators, MD is :mod:`e2ip_plugins.md`.

- :mod:`.config` — ``al.yaml`` keys, defaults, checks (:class:`ALConfigError`);
- :mod:`.loop` — :class:`ActiveLearningLoop`: train → evaluate → explore → select → label → append;
- :mod:`.steps` — training, held-out evaluation, exploration;
- :mod:`.select` — trust band / budget / duplicate selection, :class:`CommitteeCalculator`;
- :mod:`.label` — labelling with any ASE calculator by import path;
- :mod:`.report` — per-iteration report, plots, W&B;
- :mod:`.cli` — the command.
"""

from .config import ALConfigError, load_config
from .select import CommitteeCalculator, descriptor_distance, select_frames

__all__ = ["ALConfigError", "CommitteeCalculator", "descriptor_distance", "load_config", "select_frames"]
