"""The one error type for a request the service refuses, and how any error is told in one line.

`Refused` is raised wherever a refusal is decided (request validation in app.py, batch jobs in batch_jobs.py)
and rendered once, as MLflow's scoring server does: `{"error": {"code", "message", "field", "item"}}` (`Error`)
with the status, and the headers the status calls for (`WWW-Authenticate` on a 401, `Allow` on a 405).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

from pydantic import Field
from typing_extensions import TypedDict

from bikeshare_membership.schema import closed


@closed
class ErrorDetail(TypedDict):
    """What was refused, and where."""

    code: Annotated[str, Field(examples=["INVALID_PARAMETER_VALUE"])]
    message: Annotated[str, Field(description="What is wrong, for a person.")]
    field: Annotated[str | None, Field(description="The field at fault, if one is.")]
    item: Annotated[int | None, Field(description="The trip's position in a list.")]


@closed
class Error(TypedDict):
    """Every error, in the shape of MLflow's scoring server plus the field and the item."""

    error: ErrorDetail


class Refused(Exception):
    """A request the service refuses: HTTP status, error code, message, and the field and list item at fault."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        item: int | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.item = status, code, message, field, item
        self.headers = list(headers)

    def body(self) -> Error:
        return {"error": {"code": self.code, "message": self.message, "field": self.field, "item": self.item}}


def first_line(error: BaseException) -> str:
    """An error as one short line, for logs and /health."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {text[:300]}"
