"""streamlme: a linear mixed-effects model kept live over an event stream."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streamlme.spec import ModelSpec, SpecError
from streamlme.stats import GroupStats, StatsError

if TYPE_CHECKING:
    from streamlme.client import Client
    from streamlme.lmm import LMMResult, lmer

__all__ = ["Client", "GroupStats", "LMMResult", "ModelSpec", "SpecError", "StatsError", "lmer"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The client pulls in redis-py; import it when asked for, so `import streamlme` stays light.
    if name == "Client":
        from streamlme.client import Client

        return Client
    # lmer pulls in pandas, scipy and formulaic; `import streamlme` stays light without them
    if name in ("lmer", "LMMResult"):
        from streamlme import lmm as module

        return getattr(module, name)
    raise AttributeError(f"module 'streamlme' has no attribute {name!r}")
