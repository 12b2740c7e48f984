"""Plan rules (spacing, transpose, normalisation, topology, anchors, memory) and the typed plan."""

from planner.plan.plan import AnchorPlan, ArchitecturePlan, Plan

__all__ = ["AnchorPlan", "ArchitecturePlan", "Plan"]
