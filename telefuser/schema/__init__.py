"""Pydantic models of the recipe and the plan: the single source of truth for both schemas."""

from .plan import PLAN_FORMAT, PLAN_VERSION, Plan
from .recipe import Recipe
from .resolution import RESOLUTION_TABLE, frame_size

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "Plan", "Recipe", "RESOLUTION_TABLE", "frame_size"]
