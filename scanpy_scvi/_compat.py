"""scanpy-style logging and warnings, with a fallback when scanpy's private logger moves."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

try:  # scanpy's logger is used de facto by its ecosystem but is not public API
    from scanpy import logging as logg

    logg.info, logg.hint, logg.debug  # noqa: B018
except (ImportError, AttributeError):  # pragma: no cover - depends on the scanpy version
    import logging as _logging

    class _Logg:
        _log = _logging.getLogger("scanpy_scvi")

        def info(self, msg, *, time=None, deep=None):
            self._log.info(msg)

        def hint(self, msg, **kwargs):
            self._log.info(msg)

        def debug(self, msg, **kwargs):
            self._log.debug(msg)

        def warning(self, msg, **kwargs):
            self._log.warning(msg)

    logg = _Logg()

_PACKAGE_DIR = str(Path(__file__).parent)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn, pointing at the first frame outside this package (the user's call).

    Python >= 3.12 has ``skip_file_prefixes`` for this; before, the stack level is counted.
    """
    if sys.version_info >= (3, 12):
        warnings.warn(message, category, skip_file_prefixes=(_PACKAGE_DIR,))
        return
    level, frame = 2, sys._getframe(1)  # 2: the caller of warn()
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)
