"""``e2ip-active-learning --config al.yaml --workdir DIR``: the active-learning loop (issue 14).

Running it again with the same ``DIR`` resumes: finished steps are skipped, an interrupted step is
redone from its last completed unit (a training run, an MD run, a labelled structure). Bad input —
an unreadable or inconsistent config, a labeller import path that does not exist, missing labels in
the data files, a training config the adapter cannot drive — fails before anything runs, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import ALConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="e2ip-active-learning", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="al.yaml (see e2ip_plugins/active_learning/config.py)")
    p.add_argument("--workdir", required=True, help="work directory; the same one again resumes the run")
    p.add_argument("--iterations", type=int, default=None, help="override `iterations` (e.g. to extend a finished run)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def log(msg: str) -> None:
        print(f"e2ip-active-learning: {msg}", flush=True)

    try:
        cfg = load_config(args.config)
        if args.iterations is not None and args.iterations < 0:
            raise ALConfigError(f"--iterations must be >= 0, got {args.iterations}")
        from .loop import ActiveLearningLoop

        loop = ActiveLearningLoop(cfg, args.workdir, log=log)
    except ALConfigError as err:
        print(f"e2ip-active-learning: error: {err}", file=sys.stderr)
        return 2
    loop.run(args.iterations)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
