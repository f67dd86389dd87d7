"""Execution back ends: where the model's code runs.

- :class:`Inline`: on the calling thread (no hand-off; the fastest for cheap models).
- :class:`Threads`: on worker threads owned by the back end.
- :class:`Processes`: in supervised worker processes (GIL-bound or crash-prone models).
"""

from ._base import Backend as Backend
from ._inline import Inline as Inline
from ._process import Processes as Processes
from ._thread import Threads as Threads

__all__ = ["Backend", "Inline", "Processes", "Threads"]
