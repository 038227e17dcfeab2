"""How library code tells whoever runs it what is happening: one callback, ``on_event(event)``.

Library functions that take long (jobs, training, downloads) accept ``on_event: OnEvent | None`` and call it
with plain dicts; they never print. The command line turns events into progress bars and lines
(``omnilabel.cli.display``); a notebook or a service can log them. Every event has an ``"event"`` key:

- ``progress``: ``done`` and ``total`` units of work (``unit``: ``images``), after each finished shard
  (first with the work resumed from an earlier run).
- ``warning``: ``message``, one line a person should read (images left out, missing files).
- ``download``: ``file``, ``done`` and ``total`` bytes (``total`` None when unknown).
- ``worker``: a Ray worker of a per-image job is up: ``node`` (host name), ``node_id`` (Ray's), ``pid``,
  ``threads``, ``nice``.
- Training: ``start`` (``step``, ``total_steps``, and for epochs ``steps_per_epoch``, ``epochs``;
  ``resumed_from``), ``step`` (``step``, ``loss``, ``lr``, and ``images_per_s`` where measured), ``epoch``
  (``epoch``, ``step``, ``val`` metrics and ``best`` with validation), ``checkpoint``, ``done``; the same
  records the run's ``metrics.jsonl`` / ``log.jsonl`` hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: ``on_event({"event": kind, ...})``: see the module docstring.
OnEvent = Callable[[dict[str, Any]], None]


def emit(on_event: OnEvent | None, event: str, **fields: Any) -> None:
    """Call ``on_event({"event": event, **fields})`` when there is a callback."""
    if on_event is not None:
        on_event({"event": event, **fields})
