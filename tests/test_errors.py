"""The error tree: shape, one-line messages, facts as attributes."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import cflow.errors as errors_module
from cflow import errors as E

ALL_ERRORS = [
    obj for obj in vars(E).values()
    if inspect.isclass(obj) and issubclass(obj, E.CflowError)
]


def test_every_error_is_exported_and_rooted() -> None:
    names = {cls.__name__ for cls in ALL_ERRORS}
    assert names == set(E.__all__)
    for cls in ALL_ERRORS:
        assert issubclass(cls, E.CflowError)


@pytest.mark.parametrize(
    ("child", "parent"),
    [
        (E.ConcurrencyConflict, E.ConflictError),
        (E.LeaseLost, E.ConflictError),
        (E.AlreadyClaimed, E.ConflictError),
        (E.MalformedEvent, E.InvalidInput),
        (E.DependencyError, E.InvalidInput),
        (E.QueryRejected, E.InvalidInput),
        (E.InvalidInput, ValueError),
        (E.Paused, E.InvalidState),
        (E.Unavailable, ConnectionError),
        (E.ClockOffsetError, E.CflowError),
        (E.NotFound, E.CflowError),
        (E.LimitExceeded, E.CflowError),
    ],
)
def test_tree_shape(child: type[Exception], parent: type[Exception]) -> None:
    assert issubclass(child, parent)


def test_tree_is_drawn_in_the_module_docstring() -> None:
    doc = errors_module.__doc__ or ""
    for cls in ALL_ERRORS:
        assert cls.__name__ in doc, cls.__name__


@pytest.mark.parametrize(
    ("err", "facts"),
    [
        (E.ConcurrencyConflict("cf.s.evt.task.t", 3, 5),
         {"subject": "cf.s.evt.task.t", "expected": 3, "actual": 5}),
        (E.LeaseLost("t1", 7, "expired"), {"task_id": "t1", "epoch": 7, "reason": "expired"}),
        (E.AlreadyClaimed("t1", "claimed", "bob"),
         {"task_id": "t1", "status": "claimed", "owner": "bob"}),
        (E.NotFound("task", "t9"), {"kind": "task", "ident": "t9"}),
        (E.MalformedEvent("bad json", "cf.s.evt.task.t"),
         {"reason": "bad json", "subject": "cf.s.evt.task.t"}),
        (E.Paused("swarm", "maintenance"), {"scope": "swarm", "reason": "maintenance"}),
        (E.ClockOffsetError(2_000, 1_000, 500),
         {"remote_ms": 2_000, "local_ms": 1_000, "max_offset_ms": 500}),
        (E.Unavailable("no server\nreachable", url="nats://x"), {"url": "nats://x"}),
    ],
)
def test_errors_keep_facts_and_print_one_line(err: E.CflowError, facts: dict[str, object]) -> None:
    assert err.facts == facts
    for name, value in facts.items():
        assert getattr(err, name) == value
    text = str(err)
    assert text
    assert "\n" not in text
    assert "  " not in text
    assert err.message == text


def test_concurrency_conflict_message_names_the_facts() -> None:
    text = str(E.ConcurrencyConflict("cf.s.evt.task.t", 3, 5, detail="retry"))
    assert text == (
        "concurrency conflict on cf.s.evt.task.t: expected last sequence 3, found 5 (retry)"
    )
    assert "found" not in str(E.ConcurrencyConflict("x", 0))


def test_codes_are_distinct_where_clients_branch_on_them() -> None:
    codes = {E.LeaseLost.code, E.NotFound.code, E.InvalidInput.code, E.Unavailable.code,
             E.ClockOffsetError.code, E.ConflictError.code, E.InvalidState.code,
             E.LimitExceeded.code}
    assert len(codes) == 8


def test_foundation_modules_raise_only_the_error_tree() -> None:
    """No bare ``raise Exception``/``RuntimeError`` in the pure core (STYLE.md point 5)."""
    src = Path(E.__file__).parent
    allowed = {cls.__name__ for cls in ALL_ERRORS} | {"AssertionError", "AttributeError"}
    for path in [src / "hlc.py", src / "events.py", src / "errors.py",
                 *sorted((src / "streams").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                name = func.id if isinstance(func, ast.Name) else None
                if name and name[0].isupper():
                    assert name in allowed, f"{path.name}:{node.lineno} raises {name}"
