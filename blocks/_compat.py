"""Prefect internals the package relies on, imported in one place."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, cast

from prefect._internal.compatibility.async_dispatch import async_dispatch as _async_dispatch

__all__ = ["async_dispatch"]

P = ParamSpec("P")
R = TypeVar("R")


def async_dispatch(
    async_impl: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Prefect's ``async_dispatch``, typed as the sync twin it decorates.

    At run time, calling the sync twin from async code still returns the async twin's
    coroutine (Prefect's behaviour); typed async code should call the ``a``-prefixed method.
    """
    return cast(Callable[[Callable[P, R]], Callable[P, R]], _async_dispatch(async_impl))
