"""The committed JSON Schemas are generated from the pydantic models and must not drift."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from telefuser.schema.backends import ATTENTION_BACKENDS
from telefuser.schema.enums import AttnImplType
from telefuser.schema.generate import SCHEMA_DIR, SCHEMA_FILES, schema_text
from telefuser.schema.resolution import RESOLUTION_TABLE, frame_size


def test_committed_schemas_match_models():
    for filename, model in SCHEMA_FILES.items():
        committed = (SCHEMA_DIR / filename).read_text(encoding="utf-8")
        assert committed == schema_text(model), f"{filename} is stale: run `python -m telefuser.schema` and commit"


def test_schemas_are_valid_draft_2020_12():
    for filename in SCHEMA_FILES:
        jsonschema.Draft202012Validator.check_schema(json.loads((SCHEMA_DIR / filename).read_text()))


def test_unknown_keys_rejected_everywhere():
    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, node.get("title")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads((SCHEMA_DIR / "recipe.schema.json").read_text()))


def test_every_attention_impl_has_requirements():
    assert set(ATTENTION_BACKENDS) == {impl.value for impl in AttnImplType}


def test_resolution_table():
    assert frame_size("480p", "16:9") == (832, 480)
    assert frame_size("720p", "16:9") == (1280, 720)
    assert frame_size("480p", "9:16") == (480, 832)
    for by_ratio in RESOLUTION_TABLE.values():
        wide = by_ratio[next(iter(by_ratio))]
        for w, h in by_ratio.values():
            assert w % 16 == 0 and h % 16 == 0
            assert w * h <= wide[0] * wide[1]  # no ratio costs more pixels than 16:9


def test_docs_key_table_matches_the_models():
    from telefuser.schema.generate import recipe_key_table

    doc = (Path(__file__).resolve().parent.parent / "docs" / "recipes.md").read_text()
    assert recipe_key_table() in doc, "docs/recipes.md is stale: run python -m telefuser.schema docs/recipes.md"
