"""The one exception root and what an error says about where it is."""

from __future__ import annotations

from service.errors import BadInputError, InvalidFileError, InvalidParameterError


def test_errors_share_one_root_and_say_where() -> None:
    err = InvalidFileError("row 3: bad", row=3, column=None)
    assert isinstance(err, BadInputError)
    assert err.to_dict() == {"code": "invalid_file", "message": "row 3: bad", "row": 3}
    assert err.status_code == 400 and InvalidParameterError("x").status_code == 422


def test_a_quota_error_keeps_its_retry_after_through_the_submit_pool() -> None:
    """The pool sends errors back as (class, message, where): Retry-After comes from
    ``where``, so the rebuilt error answers with the same header."""
    import pickle

    from service.errors import DocqueueError, QuotaExceededError
    from service.jobs.pool import _Failure

    err = QuotaExceededError("quota queued_rows exceeded", quota="queued_rows", retry_after_s=30)
    assert err.status_code == 429 and err.headers == {"Retry-After": "30"}
    failure = pickle.loads(pickle.dumps(_Failure(type(err), err.message, err.where)))
    again = failure.rebuild()
    assert isinstance(again, QuotaExceededError) and again.headers == {"Retry-After": "30"}
    assert again.to_dict() == err.to_dict()
    assert DocqueueError("x").headers == {}  # the class default elsewhere
