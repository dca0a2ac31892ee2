"""Dictionaries shipped with lmsmith's data tools (found with `importlib.resources`), and the readers of
them and of the user's own YAML and term lists (PyYAML, keeping line numbers so every complaint names
`file:line`):

- `finance_terms.txt`: the domain terms whose coverage the quality report measures;
- `finance_synonyms.yaml`: synonym groups for EDA synonym replacement and insertion;
- `metrics.yaml`: financial metrics (table column → Chinese/English names and aliases), the metric
  gazetteer for annotation and the names synthesis writes;
- `ratios.yaml`: the ratios synthesis asks about (numerator, denominator, percent or not).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lmsmith.errors import UserError

Key = tuple[Any, ...]


def resource_path(name: str) -> Path:
    """The path of a dictionary shipped with lmsmith (`finance_terms.txt`, `metrics.yaml`, ...)."""
    path = Path(str(resources.files("lmsmith.data.resources").joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"lmsmith ships no resource named {name!r}")
    return path


@dataclass
class YamlFile:
    """Parsed YAML plus the line of every value, so validation errors can point into the file."""

    path: Path
    data: Any
    lines: dict[Key, int]

    def where(self, *key: Any) -> str:
        """`file:line` of the value at `key` (or of its closest enclosing value)."""
        while key and key not in self.lines:
            key = key[:-1]
        return f"{self.path}:{self.lines.get(key, 1)}"


def _record_lines(node: yaml.Node, key: Key, lines: dict[Key, int], loader: yaml.SafeLoader, line: int) -> None:
    """Record `line` for `key`; a mapping's entries get the line of their key (where `name:` is written)."""
    lines[key] = line
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            name = loader.construct_object(key_node, deep=True)
            if isinstance(name, (str, int, float, bool)):
                _record_lines(value_node, (*key, name), lines, loader, key_node.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, (*key, index), lines, loader, item.start_mark.line + 1)


def read_yaml(path: str | Path) -> YamlFile:
    """Parse `path`; a syntax error is a UserError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise UserError(f"{path}:{line}: invalid YAML: {exc.problem or exc.context}") from None
    lines: dict[Key, int] = {}
    if node is not None:
        _record_lines(node, (), lines, yaml.SafeLoader(""), node.start_mark.line + 1)
    return YamlFile(path, data, lines)


def read_term_list(path: str | Path) -> list[str]:
    """One term a line; blank lines and `#` comments skipped; duplicates kept once, in order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    terms: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        term = line.strip()
        if term and not term.startswith("#"):
            terms[term] = None
    if not terms:
        raise UserError(f"{path}:1: the term list is empty")
    return list(terms)
