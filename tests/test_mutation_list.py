"""tools/mutation_check.py's list stays runnable: every mutation's text is found exactly once in its file
(a stale one would stop a full run midway), the mutated file still compiles (a syntax error would make
every test fail and count as a catch), names are unique, and the tests it names exist."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_mutations():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "tools" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.MUTATIONS


def test_every_mutation_applies_exactly_once_and_names_existing_tests():
    mutations = load_mutations()
    assert len({m.name for m in mutations}) == len(mutations)
    for m in mutations:
        assert (ROOT / m.file).read_text().count(m.old) == 1, m.name
        assert m.old != m.new, m.name
        compile((ROOT / m.file).read_text().replace(m.old, m.new), m.file, "exec")  # a bug, not a syntax error
        for test in m.tests:
            path, _, name = test.partition("::")
            assert (ROOT / path).is_file(), (m.name, test)
            assert not name or f"def {name.split('[')[0]}(" in (ROOT / path).read_text(), (m.name, test)
