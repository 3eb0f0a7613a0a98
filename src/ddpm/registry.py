"""Name -> function registries: schedules, datasets and feature extractors are each one dict that a config names
into, filled by a decorator built here. (Samplers keep several facts per name, so ddpm.samplers.register_sampler
fills its own tables.)"""
from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def registrar(table: dict[str, F]) -> Callable[[str], Callable[[F], F]]:
    """A decorator factory for `table`: `register = registrar(TABLE)`, then `@register("name")` adds a function."""

    def register(name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            table[name] = fn
            return fn

        return add

    return register
