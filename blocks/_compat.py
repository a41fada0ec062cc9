"""Prefect internals the package relies on, imported in one place."""

from prefect._internal.compatibility.async_dispatch import async_dispatch

__all__ = ["async_dispatch"]
