"""Settings declared once, as dataclass fields, and spelled out as keyword arguments where used.

A model's architecture (or any other group of settings) is a frozen dataclass whose fields
carry their default, their documentation and their check. :func:`keyword_settings` puts those
fields into the signature and the numpydoc of each function or constructor that takes them, so
adding a setting is one field: the torch module, the model class, the ``pp`` function and the
saved JSON all follow.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
from typing_extensions import Self

F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S", bound="Settings")


def setting(default: Any, doc: str, *, choices: Sequence[Any] | None = None, check: Callable | None = None):
    """A settings field: its default, one numpydoc description, and optionally its allowed values
    or a check ``check(name, value)`` that raises ``ValueError``."""
    return dataclasses.field(default=default, metadata={"doc": doc, "choices": choices, "check": check})


def positive_int(name: str, value: Any) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        msg = f"{name} must be a positive integer, got {value!r}."
        raise ValueError(msg)


def check_positive_int(**values: Any) -> None:
    """Raise ``ValueError`` unless every value is a positive integer."""
    for name, value in values.items():
        positive_int(name, value)


def unit_interval(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        msg = f"{name} must be in [0, 1), got {value!r}."
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of settings dataclasses: fields made with :func:`setting` are checked on creation."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                msg = f"{f.name}={value!r} is not one of {tuple(choices)}."
                raise ValueError(msg)
            if f.metadata.get("check") is not None:
                f.metadata["check"](f.name, value)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "settings") -> Self:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error (a newer file)."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            msg = f"{source}: unknown {cls.__name__} settings {unknown}; was it written by a newer scanpy-scvi?"
            raise ValueError(msg)
        return cls(**values)

    def replace(self, **changes) -> Self:
        return dataclasses.replace(self, **changes)


def keyword_settings(*groups: type[Settings]) -> Callable[[F], F]:
    """Let ``func(..., **settings)`` take the fields of ``groups`` as documented keyword arguments.

    On a class, this applies to its ``__init__`` and fills the class docstring.

    The signature shows every field as a keyword-only parameter in place of ``**settings``
    (``help()``, Sphinx and IDEs at run time see them); an unknown keyword raises ``TypeError``
    as Python would. In the docstring, a line ``{GroupName}`` is replaced by the fields'
    numpydoc entries, indented like that line. ``func`` receives the given keywords only.
    """
    fields = [f for group in groups for f in dataclasses.fields(group)]

    def decorate(func: F) -> F:
        if isinstance(func, type):
            func.__init__ = decorate(func.__init__)
            func.__doc__ = _fill_doc(func.__doc__ or "", groups)
            return func
        sig = inspect.signature(func)
        params = list(sig.parameters.values())
        var_kw = [p for p in params if p.kind is p.VAR_KEYWORD]
        if len(var_kw) != 1:  # pragma: no cover - a programming error
            msg = f"{func.__qualname__} needs a **kwargs parameter for its settings."
            raise TypeError(msg)
        taken = {p.name for p in params}
        new = [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
            for f in fields
            if f.name not in taken
        ]
        allowed = {p.name for p in new}
        signature = sig.replace(parameters=[p for p in params if p.kind is not p.VAR_KEYWORD] + new)

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            unknown = [k for k in kwargs if k not in allowed and k not in taken]
            if unknown:
                msg = f"{func.__qualname__}() got an unexpected keyword argument {unknown[0]!r}"
                raise TypeError(msg)
            return func(*args, **kwargs)

        wrapper.__signature__ = signature
        wrapper.__doc__ = _fill_doc(func.__doc__ or "", groups)
        return wrapper  # type: ignore[return-value]

    return decorate


def settings_doc(group: type[Settings], indent: str = "") -> str:
    """The numpydoc parameter entries of ``group``'s fields."""
    lines = []
    for f in dataclasses.fields(group):
        lines.append(f"{indent}{f.name}")
        lines.extend(
            textwrap.wrap(
                f.metadata["doc"],
                92,
                initial_indent=indent + "    ",
                subsequent_indent=indent + "    ",
                break_on_hyphens=False,
            )
        )
    return "\n".join(lines)


def _fill_doc(doc: str, groups: Sequence[type[Settings]]) -> str:
    by_name = {g.__name__: g for g in groups}
    out = []
    for line in doc.splitlines():
        name = line.strip()
        if name.startswith("{") and name.endswith("}") and name[1:-1] in by_name:
            out.append(settings_doc(by_name[name[1:-1]], indent=line[: len(line) - len(line.lstrip())]))
        else:
            out.append(line)
    return "\n".join(out)


def split_settings(kwargs: dict[str, Any], group: type[Settings]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the keywords that are fields of ``group``, the others)."""
    names = set(group.names())
    return {k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names}
