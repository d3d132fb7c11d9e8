"""Recipe -> plan. Loads no weights (headers only) and needs no GPU."""

from .build import compile_loaded, compile_recipe
from .recipe_loader import LoadedRecipe, load_recipe

__all__ = ["LoadedRecipe", "compile_loaded", "compile_recipe", "load_recipe"]
