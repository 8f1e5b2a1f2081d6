"""API_Central's request bodies and answers (pydantic): what is validated at the edge, and the schemas
``/docs`` shows (docs/api.md has the same shapes in prose).

Bodies refuse unknown fields and are strict (``"alert": "yes"`` is not a boolean); strings are
bounded and free of control characters; numbers finite and in range. The answers' models are the
documentation only: the app encodes what it holds directly (a list of 1,000 CPs without a model pass).
"""

from __future__ import annotations

from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, field_validator

from transport import protocol

__all__ = ["RevokeIn", "WeatherAlertIn", "LocationIn", "KeyOut", "CpOut", "ResultOut", "SessionOut", "RequestOut",
           "TicketOut", "DriverOut", "MessageOut", "WeatherOut", "AuditOut", "Health", "Problem", "REFUSALS",
           "COMMAND", "ERROR_MAX_LEN", "location"]

ERROR_MAX_LEN: Final = 300


# --- bodies ------------------------------------------------------------------------
def _no_control(value: str, what: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{what} must not contain control characters (line breaks, tabs…)")
    return value


def location(value: str) -> str:
    if not value.strip():
        raise ValueError("the location must not be blank")
    return _no_control(value, "the location").strip()


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RevokeIn(_Body):
    """Why the keys are revoked (kept in the audit log)."""

    reason: str = Field("", max_length=200, examples=["stolen cabinet key"])

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        return _no_control(value, "the reason")


class WeatherAlertIn(_Body):
    """EV_W's reading of one location (sent every poll; only a change of ``alert`` acts)."""

    location: str = Field(min_length=1, max_length=protocol.LOCATION_MAX_LEN, examples=["Madrid"])
    temperature_c: float | None = Field(ge=-100, le=100, allow_inf_nan=False, examples=[-2.5])
    alert: bool = Field(description="at or below 0 °C: the location's CPs go out of service")
    error: str | None = Field(None, max_length=ERROR_MAX_LEN, description="the provider's failure, if any")

    @field_validator("location")
    @classmethod
    def _loc(cls, value: str) -> str:
        return location(value)

    @field_validator("error")
    @classmethod
    def _error(cls, value: str | None) -> str | None:
        return None if value is None else _no_control(value, "the error")


class LocationIn(_Body):
    location: str = Field(min_length=1, max_length=protocol.LOCATION_MAX_LEN, examples=["Oslo"])

    @field_validator("location")
    @classmethod
    def _loc(cls, value: str) -> str:
        return location(value)


class KeyOut(BaseModel):
    status: str = Field(description="current | replaced | revoked | none")
    key_id: str | None
    issued_at: float | None


class CpOut(BaseModel):
    cp_id: str
    location: str
    price_eur_kwh: float
    state: str = Field(description="ACTIVE | SUPPLYING | STOPPED | BROKEN | DISCONNECTED")
    stop_reasons: list[str] = Field(description='why it is out of service: "operator", "weather", '
                                                '"charger" (the CP took itself out of service)')
    fault: str | None
    session_id: str | None
    driver_id: str | None
    power_kw: float
    energy_kwh: float
    cost_eur: float
    registered: bool = Field(description="it has a registry credential that works")
    key: KeyOut


class ResultOut(BaseModel):
    status: str = Field(description="ok | not_found | conflict | unavailable | invalid")
    detail: str
    cp_ids: list[str]


class SessionOut(BaseModel):
    session_id: str
    cp_id: str
    driver_id: str | None
    state: str
    started_at: float | None
    energy_kwh: float
    cost_eur: float
    power_kw: float


class RequestOut(BaseModel):
    driver_id: str
    cp_id: str
    status: str
    started_at: float | None


class TicketOut(BaseModel):
    session_id: str
    cp_id: str
    driver_id: str
    energy_kwh: float
    amount_eur: float
    price_eur_kwh: float
    started_at: float | None
    ended_at: float | None
    end_reason: str | None
    review: str | None


class DriverOut(BaseModel):
    driver_id: str
    registered: bool
    first_seen: float | None
    live_session_id: str | None


class MessageOut(BaseModel):
    seq: int
    at: float
    text: str
    fault: bool


class WeatherOut(BaseModel):
    location: str
    temperature_c: float | None
    alert: bool
    error: str | None
    updated_at: float | None
    watched: bool
    cp_ids: list[str]


class AuditOut(BaseModel):
    id: int
    at: float
    component: str
    subject: str
    address: str | None
    event: str
    detail: str
    params: dict[str, Any] | None


class Health(BaseModel):
    status: str


class Problem(BaseModel):
    detail: str


REFUSALS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "no operator token, or a wrong one (audited)"},
    422: {"model": Problem, "description": "the request is invalid (the sentence says why)"},
    429: {"model": Problem, "description": "too many wrong tokens from this address; see Retry-After"},
}
COMMAND: dict[int | str, dict[str, Any]] = {
    404: {"model": ResultOut, "description": "no such CP or location"},
    409: {"model": ResultOut, "description": "refused in this state (e.g. a weather alert holds the CP)"},
    503: {"model": ResultOut, "description": "Central is restarting or did not answer in time"},
}
