"""Hydra search-path plugin: ``nequip-train -cp configs/nequip`` finds the directory in the cwd.

``nequip-train`` declares ``@hydra.main(config_path=os.getcwd())`` and is launched as a
module, so Hydra turns a *relative* ``-cp configs/nequip`` into the package path
``pkg://nequip.scripts/configs/nequip``, which never exists ("Primary config module
'nequip.scripts.configs.nequip' not found"). NequIP users run from their project
directory and expect a relative path to mean the working directory, as an absolute
``-cp $PWD/configs/nequip`` does. This plugin rewrites exactly that case: the primary
("main") entry is a ``pkg://nequip.scripts/<rel>`` path and ``<cwd>/<rel>`` is a
directory. Any other search path, and any other Hydra application, is left unchanged.
"""

import os

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

NEQUIP_SCRIPTS_PKG = "pkg://nequip.scripts/"


def cwd_config_dir(path: str, cwd: str) -> str | None:
    """``file://<cwd>/<rel>`` for ``path == pkg://nequip.scripts/<rel>`` when that directory exists."""
    if not path.startswith(NEQUIP_SCRIPTS_PKG):
        return None
    rel = path[len(NEQUIP_SCRIPTS_PKG):]
    candidate = os.path.normpath(os.path.join(cwd, rel))
    if rel and os.path.isdir(candidate):
        return "file://" + candidate
    return None


class NequIPRelativeConfigPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for element in search_path.get_path():
            if element.provider != "main":
                continue
            new_path = cwd_config_dir(element.path, os.getcwd())
            if new_path is not None:
                element.path = new_path
