"""Errors of the MACE adapter, and the installed mace-torch version their messages quote (imports no MACE)."""


class E2IPConfigError(ValueError):
    """The backbone cannot carry an evidential head (e.g. no l > 0 features to read)."""


class MACEHookError(ImportError):
    """A MACE symbol the e2ip adapter depends on is missing (MACE moved or renamed it)."""


def installed_mace_version() -> str:
    try:
        from importlib.metadata import version

        return version("mace-torch")
    except Exception:  # pragma: no cover
        return "unknown"
