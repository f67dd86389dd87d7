from __future__ import annotations

import pickle

import pytest

import servekit as sk
from servekit import errors


def _error_classes() -> list[type[sk.ServekitError]]:
    return [getattr(errors, name) for name in errors.__all__]


def test_codes_are_unique_and_stable() -> None:
    codes = [cls.code for cls in _error_classes()]
    assert len(codes) == len(set(codes))
    assert sk.Overloaded.code == "overloaded"
    assert sk.DeadlineExceeded.code == "deadline_exceeded"
    assert sk.InvalidInput.code == "invalid_input"


def test_builtin_bases_where_the_meaning_matches() -> None:
    assert issubclass(sk.DeadlineExceeded, TimeoutError)
    assert issubclass(sk.InvalidInput, ValueError)
    assert issubclass(sk.BatchContractError, sk.ModelError)
    assert all(issubclass(cls, sk.ServekitError) for cls in _error_classes())


@pytest.mark.parametrize(
    "error",
    [
        sk.ServekitError("x"),
        sk.InvalidInput("bad", errors=[{"loc": "a.b", "msg": "m", "type": "t"}]),
        sk.ModelError("boom", error_type="KeyError"),
        sk.BatchContractError("3 for 4", error_type=""),
        sk.ModelLoadError("no weights"),
        sk.DeadlineExceeded("late"),
        sk.Overloaded("full", retry_after_s=0.25),
        sk.Closed("closed"),
        sk.Cancelled("gone"),
        sk.WorkerCrashed("died", exitcode=-9),
        sk.ExecutionTimeout("hung", exitcode=-9),
        sk.SerializationError("lambda"),
    ],
)
def test_errors_pickle_with_all_attributes(error: sk.ServekitError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert copy.message == error.message == str(copy)
    assert vars(copy) == vars(error)
    assert copy.code == error.code
