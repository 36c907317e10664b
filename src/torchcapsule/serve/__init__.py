"""Batched inference service (`capsule serve`). The user-facing contract is Handler."""
from .handler import DefaultHandler, Handler, InputError

__all__ = ["Handler", "DefaultHandler", "InputError"]
