"""`python -m telefuser.schema`: rewrite recipe.schema.json and plan.schema.json from the models."""

from .generate import write_schemas

if __name__ == "__main__":
    for path in write_schemas():
        print(f"wrote {path}")
