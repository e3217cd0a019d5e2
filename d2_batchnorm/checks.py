"""
Argument checks, written once. Every error reads
``<name> = <value> is not allowed; <what is allowed>``; ``name`` is whatever the caller
checks — a layer's argument ("sync_group_size") or a config key ("BN.SYNC_GROUP_SIZE").
"""
from typing import Iterable

__all__ = ["check_int", "check_float", "check_choice", "check_bool"]


def check_int(name: str, value, minimum: int) -> int:
    """
    Returns ``value`` if it is an int (not a bool) with ``minimum <= value``; raises
    ``ValueError`` naming ``name`` otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} = {value!r} is not allowed; it must be an integer >= {minimum}")
    return value


def check_float(name: str, value, minimum: float, maximum: float) -> float:
    """
    Returns ``value`` if it is a real number (an int or a float, not a bool) with
    ``minimum <= value <= maximum``; raises ``ValueError`` naming ``name`` otherwise.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not minimum <= value <= maximum  # False for NaN too
    ):
        raise ValueError(f"{name} = {value!r} is not allowed; it must be a number in [{minimum}, {maximum}]")
    return value


def check_choice(name: str, value, allowed: Iterable):
    """Returns ``value`` if it is one of ``allowed``; raises ``ValueError`` listing them otherwise."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name} = {value!r} is not allowed; allowed values: {allowed}")
    return value


def check_bool(name: str, value) -> bool:
    """Returns ``value`` if it is a bool (1 and "yes" are not); raises ``ValueError`` otherwise."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} = {value!r} is not allowed; allowed values: [True, False]")
    return value


def check_batchnorm_keys(cfg) -> None:
    """
    Raises ``ValueError`` unless the yacs config ``cfg`` has d2_batchnorm's keys (its
    ``BN`` node), i.e. was extended by ``d2_batchnorm.add_batchnorm_config``.
    """
    if "BN" not in cfg:
        raise ValueError("the config lacks d2_batchnorm's keys: call add_batchnorm_config(cfg)")
