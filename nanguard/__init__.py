"""nanguard keeps deep-learning training runs alive when numbers go bad.

The package root holds the framework-neutral core only; adapters live in
``nanguard.torch``, ``nanguard.keras`` and ``nanguard.lightning`` and are never imported here.
"""

from nanguard.config import ACTIONS, GuardConfig
from nanguard.detector import Evidence
from nanguard.dump import Dump, DumpError, load
from nanguard.events import CAUSES, Event, NonFiniteTrainingError, StepRecord
from nanguard.policy import Decision, LadderState, decide

__version__ = "0.1.0"

__all__ = [
    "ACTIONS",
    "CAUSES",
    "Decision",
    "Dump",
    "DumpError",
    "Event",
    "Evidence",
    "GuardConfig",
    "LadderState",
    "NonFiniteTrainingError",
    "StepRecord",
    "__version__",
    "decide",
    "load",
]
