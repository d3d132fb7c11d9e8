"""`python -m telefuser.schema [DOC]`: rewrite recipe.schema.json and plan.schema.json from the models,
and the key table of DOC (docs/recipes.md) when given."""

import sys
from pathlib import Path

from .generate import write_key_table, write_schemas

if __name__ == "__main__":
    for path in write_schemas():
        print(f"wrote {path}")
    for doc in sys.argv[1:]:
        write_key_table(Path(doc))
        print(f"wrote the key table of {doc}")
