"""Property-based: every malformed config value or dataset row is refused with a message naming its key or
row."""

from __future__ import annotations

import json
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from opd.cli import main
from opd.config import Config, ConfigError, build_config
from opd.tasks.files import DataError, load_rows

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _leaves(model: type[BaseModel], prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaves(ann, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", ann))
    return out


LEAVES = _leaves(Config)


def _bad_values(ann) -> st.SearchStrategy:
    """Values no field of this annotation accepts."""
    nested = st.fixed_dictionaries({"unexpected": st.integers()})  # a mapping where a scalar or list belongs
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return st.one_of(nested, st.text(min_size=1).filter(lambda s: s not in args))
    if ann in (int, float) or set(args) & {int, float}:
        return st.one_of(nested, st.text(alphabet="xyz", min_size=1), st.lists(st.integers(), min_size=1))
    if ann is bool:
        return st.one_of(nested, st.sampled_from(["maybe", "2", "[]"]))
    if origin is dict:
        return st.one_of(st.integers(), st.lists(st.integers(), min_size=1))
    if origin is list:
        return st.one_of(st.integers(), nested)
    return nested  # str and str | None


def _tree(key: str, value) -> dict:
    tree: dict = {}
    node = tree
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return tree


@st.composite
def bad_entries(draw):
    key, ann = draw(st.sampled_from(LEAVES))
    return key, draw(_bad_values(ann))


@FAST
@given(bad_entries())
def test_a_wrongly_typed_value_is_refused_naming_its_key(entry):
    key, value = entry
    with pytest.raises(ConfigError) as e:
        build_config(_tree(key, value))
    assert key in str(e.value)


@FAST
@given(st.sampled_from(sorted({k.split(".")[0] for k, _ in LEAVES if "." in k})),
       st.from_regex(r"[a-z_]{1,12}", fullmatch=True))
def test_an_unknown_key_is_refused_naming_it(section, name):
    known = {k for k, _ in LEAVES}
    if f"{section}.{name}" in known:
        return
    with pytest.raises(ConfigError, match=rf"{section}\.{name}: unknown config key"):
        build_config({section: {name: 1}})


@settings(max_examples=25, deadline=None)
@given(bad_entries())
def test_cli_exits_2_and_writes_nothing(entry):
    key, value = entry
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d) / "run"
        tree = _tree(key, value)
        tree.setdefault("run", {})
        if isinstance(tree["run"], dict):
            tree["run"].setdefault("output_dir", str(run_dir))
        cfg = Path(d) / "job.yaml"
        cfg.write_text(json.dumps(tree))  # JSON is YAML
        assert main(["run", str(cfg)]) == 2
        assert not run_dir.exists()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
ROWS = st.lists(
    st.one_of(
        st.fixed_dictionaries({"prompt": JSON_VALUES, "answer": JSON_VALUES},
                              optional={"extra": JSON_VALUES}),
        st.dictionaries(st.sampled_from(["prompt", "answer", "x"]), JSON_VALUES, max_size=3),
        JSON_VALUES,
    ),
    max_size=6,
)


@FAST
@given(ROWS)
def test_dataset_rows_load_or_are_refused_by_row(rows):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        try:
            out = load_rows(str(path), key="task.train_path")
        except DataError as e:
            assert str(e).startswith("task.train_path: ") and ("row " in str(e) or "no rows" in str(e))
            return
        assert len(out) == len(rows)
        assert all(isinstance(r["prompt"], str) and r["prompt"].strip() and isinstance(r["answer"], str)
                   for r in out)
