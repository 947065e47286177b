"""streamlme: a linear mixed-effects model kept live over an event stream."""

from streamlme.spec import ModelSpec, SpecError
from streamlme.stats import GroupStats, StatsError

__all__ = ["GroupStats", "ModelSpec", "SpecError", "StatsError"]
__version__ = "0.1.0"
