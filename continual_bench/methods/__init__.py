"""Continual-learning methods, one file each, registered by track (``t2i``, ``cls``)."""
from .registry import get_method, list_methods, register

__all__ = ["get_method", "list_methods", "register"]
