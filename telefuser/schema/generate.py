"""Generate the committed JSON Schemas from the pydantic models."""

from __future__ import annotations

import json
from pathlib import Path

from .plan import Plan
from .recipe import Recipe

SCHEMA_DIR = Path(__file__).parent
SCHEMA_FILES = {"recipe.schema.json": Recipe, "plan.schema.json": Plan}


def schema_text(model: type) -> str:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://telefuser.dev/schemas/{model.__name__.lower()}.schema.json"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    written = []
    for filename, model in SCHEMA_FILES.items():
        path = directory / filename
        path.write_text(schema_text(model), encoding="utf-8")
        written.append(path)
    return written
