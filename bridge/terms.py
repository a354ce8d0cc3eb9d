"""Session terms: what the order system may set for one session when it opens it, each
defined once, here, as a field of `Terms`.

A term's type and bounds are the API's check and its schema (the OpenAPI document takes
them from this model). Its `Term` metadata says which MB_ setting holds the bridge-wide
default, when that default applies, and whether a call's row keeps the term:

- default_at "open": a session opened without the term stores the default of that moment
  (changing the setting later leaves open sessions as they were);
- default_at "call": it stores null, and each call uses the setting in force then;
- on_call_row: the call's row keeps the term's value (calls.<name>), because a bridge that
  takes over a call after a restart must still honour it.

The sessions table has a column of the same name for each term (and the calls table one for
each term kept on the call row); the store reads and writes every term by name, routing
hands each call its session's effective terms (Route.terms), and the admin tool has an
option for each. Adding a term: a field here, its migration, and the code that acts on it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bridge.abuse import QuietHours, parse_quiet_setting
from bridge.envtext import whole, yes_no
from bridge.errors import InvalidInput
from bridge.limits import MAX_CAP, MAX_SECONDS, Whole


@dataclass(frozen=True)
class Term:
    """What a term says besides its type and bounds (see the module's docstring)."""

    env: str  # the MB_ setting with the bridge-wide default
    env_default: str  # that setting's own default, as written in the environment
    summary: str  # one line, for the settings tables
    parse_env: Callable[[str], Any]  # the setting's text -> the term's value (raises ValueError)
    default_at: Literal["open", "call"] = "call"
    on_call_row: bool = False


def _quiet(text: str) -> QuietHours | Literal[False]:
    try:
        return parse_quiet_setting(text) or False
    except InvalidInput:
        raise ValueError('must look like "22:00-08:00 Europe/Moscow", or be empty') from None


class Terms(BaseModel):
    """The terms of one session. A term left null takes the bridge's default (its MB_ setting)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    calls_per_hour: Annotated[Whole | None, Field(
        ge=0, le=MAX_CAP,
        description="Cap on the calls put through in this session (both directions) per hour; 0: none. Null: "
        "the bridge's default (`MB_CALLS_PER_HOUR`). A call over the cap is refused: the caller hears that the "
        "call cannot be put through now (outcome `call_limit`).",
    ), Term("MB_CALLS_PER_HOUR", "0", "default cap on calls put through per session and hour (0: none)",
            whole(0, MAX_CAP))] = None
    calls_per_day: Annotated[Whole | None, Field(
        ge=0, le=MAX_CAP,
        description="Cap on the calls put through in this session per day (as `calls_per_hour`). Null: the "
        "bridge's default (`MB_CALLS_PER_DAY`).",
    ), Term("MB_CALLS_PER_DAY", "0", "default cap on calls put through per session and day (0: none)",
            whole(0, MAX_CAP))] = None
    quiet_hours: Annotated[QuietHours | Literal[False] | None, Field(
        description="Quiet hours: nobody is put through to the client in this window (in its time zone; it may "
        "run over midnight). False: none for this session. Null: the bridge's default (`MB_QUIET_HOURS`).",
    ), Term("MB_QUIET_HOURS", "", 'default quiet hours, e.g. "22:00-08:00 Europe/Moscow": nobody is put '
            "through to the client", _quiet)] = None
    max_call_seconds: Annotated[Whole | None, Field(
        ge=1, le=MAX_SECONDS,
        description="The longest a call of this session may last once answered; both parties hear a warning "
        "tone (`MB_CALL_WARNING` seconds, at most half the maximum, before the end), then the bridge ends it "
        "(`cut_reason` `max_duration`). Null: the bridge's default (`MB_MAX_CALL_DURATION`, 0 = none).",
    ), Term("MB_MAX_CALL_DURATION", "0", "default maximum call duration in seconds (0: none)",
            whole(0, MAX_SECONDS, zero_is_none=True), on_call_row=True)] = None
    record: Annotated[bool | None, Field(
        description="Whether the session's calls are recorded. Then, when the called phone answers, both "
        "parties hear that the call is recorded (each on their own line, before they hear each other), and the "
        "call is recorded as one WAV file, reached only with the recording token (`MB_RECORDING_TOKEN`) and "
        "deleted after `MB_RECORDING_RETENTION_DAYS`. Null: the bridge's default (`MB_RECORD_CALLS`), taken "
        "at open.",
    ), Term("MB_RECORD_CALLS", "no", 'record the calls of sessions opened without "record" (yes/no)', yes_no,
            default_at="open", on_call_row=True)] = None

    confirm_answer: Annotated[bool | None, Field(
        description="Whether the called phone confirms before the two are joined: it answers and hears \"you "
        "have an incoming call; press 1 to accept this call, or 2 to reject it\" (in the pool number's language) "
        "while the caller still hears ringback. A voicemail or answering machine, which never presses 1, is never "
        "joined: its greeting (which often says its owner's name or number) never reaches the caller; the call's "
        "outcome is `not_confirmed` (`rejected` for 2). Null: the bridge's default (`MB_CONFIRM_ANSWER`), taken "
        "at open.",
    ), Term("MB_CONFIRM_ANSWER", "no", 'the called phone presses 1 before it is joined, for sessions opened without '
            '"confirm_answer" (yes/no)', yes_no, default_at="open", on_call_row=True)] = None

    @field_validator("quiet_hours", mode="before")
    @classmethod
    def _false_is_not_zero(cls, value: Any) -> Any:
        # (pydantic's Literal[False] takes 0 too, strict or not: 0 == False in Python.)
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise ValueError("must be an object, false or null")
        return value

    # --- the definition, read -----------------------------------------------------------

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(cls.model_fields)

    @classmethod
    @functools.cache  # (read for every term at every open and call: the definition never changes)
    def term(cls, name: str) -> Term:
        return next(m for m in cls.model_fields[name].metadata if isinstance(m, Term))

    @classmethod
    def unset(cls, name: str) -> Any:
        """A term's value where there is none to take: false for a flag, else null."""
        return False if bool in get_args(cls.model_fields[name].annotation) else None

    @classmethod
    def on_call_row_names(cls) -> tuple[str, ...]:
        return tuple(n for n in cls.names() if cls.term(n).on_call_row)

    # --- values -------------------------------------------------------------------------

    @classmethod
    def defaults_from_env(cls, environ: Mapping[str, str]) -> "Terms":
        """The bridge-wide defaults, from the MB_ settings. Raises ValueError naming every
        setting that is wrong."""
        values: dict[str, Any] = {}
        problems: list[str] = []
        for name in cls.names():
            term = cls.term(name)
            try:
                values[name] = term.parse_env(environ.get(term.env, term.env_default))
            except ValueError as exc:
                problems.append(f"{term.env} {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return cls.model_validate(values)

    def at_open(self, defaults: "Terms") -> "Terms":
        """What a session stores: the terms given, with the defaults of the terms that take
        theirs at open."""
        return self.model_copy(update={
            n: getattr(defaults, n) for n in self.names()
            if getattr(self, n) is None and self.term(n).default_at == "open"
        })

    def effective(self, defaults: "Terms") -> "Terms":
        """What a call of the session honours: every term left null takes its default."""
        return self.model_copy(update={n: getattr(defaults, n) for n in self.names() if getattr(self, n) is None})

    def on_call_row(self) -> dict[str, Any]:
        """The terms a call's row keeps, by column."""
        return {n: getattr(self, n) for n in self.on_call_row_names()}

    def to_api(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    # --- the database --------------------------------------------------------------------

    @classmethod
    @functools.cache
    def json_names(cls) -> tuple[str, ...]:
        """Terms stored as JSON (jsonb columns): those whose value can be an object."""
        return tuple(n for n, info in cls.model_fields.items()
                     if any(isinstance(a, type) and issubclass(a, BaseModel) for a in get_args(info.annotation)))

    def to_columns(self) -> list[Any]:
        """The terms' column values, in `names()` order (JSON terms as JSON text)."""
        api = self.to_api()
        return [json.dumps(api[n]) if n in self.json_names() and api[n] is not None else api[n]
                for n in self.names()]

    @classmethod
    def from_columns(cls, row: Mapping[str, Any], names: tuple[str, ...] | None = None) -> "Terms":
        """Terms as stored in a row (of sessions, or the call row's `on_call_row_names`)."""
        values = {n: row[n] for n in names or cls.names()}
        for name in cls.json_names():
            if isinstance(values.get(name), str):
                values[name] = json.loads(values[name])
        return cls.model_validate(values, strict=False)
