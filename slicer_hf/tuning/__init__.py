"""SLICER-Search: profile what a split costs on each machine, then choose the split layer and codec knobs for a
client's device, link and quality budget (`profile`, `planner`); `distortion` measures the codec's rate and
distortion on real text."""

from .planner import Candidate, Constraints, InfeasibleError, LinkSpec, SearchResult, search
from .profile import LayerCost, Profile, RatePoint, profile_model

__all__ = [
    "Candidate",
    "Constraints",
    "InfeasibleError",
    "LayerCost",
    "LinkSpec",
    "Profile",
    "RatePoint",
    "SearchResult",
    "profile_model",
    "search",
]
