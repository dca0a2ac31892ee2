"""docs/data.md is generated from the operator registry and must be up to date."""

from __future__ import annotations

from pathlib import Path

from lmsmith.data.catalog import render
from lmsmith.data.steps import REGISTRY

DOC = Path(__file__).resolve().parents[1] / "docs" / "data.md"


def test_docs_data_md_is_up_to_date_with_the_registry():
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/data.md is stale: run `python -m lmsmith.data.catalog > docs/data.md`"
    )


def test_catalog_lists_every_operator_with_params_and_an_example():
    text = render()
    for name in REGISTRY:
        assert f"### `{name}`" in text
    assert "| `output` | Literal['plain', 'thousands', 'yi', 'wan'] | `plain` |" in text
    assert "`营收120000000元，净利润-35000000元，up 15%; revenue of RMB 1200000000`" in text
