"""Limits and tolerances both stores apply (merge.lua and models.lua hard-code the same values)."""

#: Model versions kept; older ones are dropped when a new one is stored.
MODEL_HISTORY = 100

#: A retraction may take out this much more than a group's mass (relative, for rounding) before
#: it is refused as overdrawn.
OVERDRAW_RTOL = 1e-9
