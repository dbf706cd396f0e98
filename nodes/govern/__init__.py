"""The Govern node: the registry of every artifact, and sign-off reviews.

``reviews`` holds the rules, pure and with an injectable clock; ``node`` serves them on
``sy.cmd.govern.<verb>`` and keeps every review in the ``sy_govern`` KV bucket.
"""

from nodes.govern.node import GovernNode

__all__ = ["GovernNode"]
