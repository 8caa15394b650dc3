"""The request checks that openai_api.py and openai_sampling.py share: ApiError (OpenAI's JSON
error object) and checked values that name the field they came from. A leaf: imports no other
module of the package."""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from starlette.responses import JSONResponse


class ApiError(Exception):
    """An error answered as OpenAI's JSON error object."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def bad_field(param: str, message: str) -> ApiError:
    """A 400 naming the request field."""
    return ApiError(400, message, param=param)


def show_value(v: Any) -> str:
    """A value for an error message, cut short (a 4000-digit number is not worth echoing)."""
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def checked_number(body: dict, name: str, lo: Optional[float], hi: Optional[float], lo_open: bool = False,
                   hi_open: bool = False, integer: bool = False) -> Any:
    """body[name] checked to be a number (an int if integer) in the range (None: that side is
    unbounded); None when absent/null."""
    v = body.get(name)
    if v is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) \
            or (isinstance(v, float) and not math.isfinite(v)):
        raise bad_field(name, f"{name} must be {kind}, not {show_value(v)}")
    low = lo is not None and (v < lo or (lo_open and v == lo))
    high = hi is not None and (v > hi or (hi_open and v == hi))
    if low or high:
        lb, hb = "(" if lo_open else "[", ")" if hi_open else "]"
        lo_text, hi_text = ("-inf" if lo is None else f"{lo:g}"), ("inf" if hi is None else f"{hi:g}")
        raise bad_field(name, f"{name} must be in {lb}{lo_text}, {hi_text}{hb}, not {show_value(v)}")
    return v
