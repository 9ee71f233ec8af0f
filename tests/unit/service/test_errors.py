"""The one exception root and what an error says about where it is."""

from __future__ import annotations

from service.errors import BadInputError, InvalidFileError, InvalidParameterError


def test_errors_share_one_root_and_say_where() -> None:
    err = InvalidFileError("row 3: bad", row=3, column=None)
    assert isinstance(err, BadInputError)
    assert err.to_dict() == {"code": "invalid_file", "message": "row 3: bad", "row": 3}
    assert err.status_code == 400 and InvalidParameterError("x").status_code == 422
