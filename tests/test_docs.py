"""The docs name tests as evidence; every test they name must exist."""

import re

import pytest
from conftest import ROOT


@pytest.mark.parametrize("doc", ["docs/reliability.md", "train/README.md"])
def test_every_test_a_doc_names_exists(doc):
    text = (ROOT / doc).read_text()
    named = set(re.findall(r"(tests/test_\w+\.py)::(\w+)", text))
    missing = [f"{file}::{name}" for file, name in sorted(named)
               if not (ROOT / file).is_file() or f"def {name}(" not in (ROOT / file).read_text()]
    assert not missing, f"{doc} names tests that do not exist: {missing}"
