import json
import os

from curate import schema
from tests.conftest import REPO


def test_schema_json_copies_match_the_code():
    for name, sch in schema.SCHEMAS.items():
        with open(os.path.join(REPO, "schemas", f"{name}.json"), encoding="utf-8") as fh:
            assert json.load(fh) == schema.describe(sch), f"run: python -m curate.schema schemas"


def test_every_field_is_documented():
    for sch in schema.SCHEMAS.values():
        assert all(schema.FIELD_DOCS.get(f.name) for f in sch)
