"""The Usage API for embeddings (`GET /v1/organization/usage/embeddings`): its query, its wire types, its SQL.

The shapes and field names are OpenAI's (openai-python `types/admin/organization/usage_embeddings_*`), so the
SDK's `client.admin.organization.usage.embeddings(...)` reads our answers. Our one extension is `images` on each
result. Buckets are aligned to `start_time` (bucket k covers `[start_time + k*width, start_time + (k+1)*width)`),
every bucket of the page is present, empty ones with `results: []`, and `next_page` is an opaque cursor to the
next range of buckets.

Only records with a 2xx status count (requests, tokens and images): a refused or failed request used no model.
The rows of refused requests stay in the table for audit. The answer covers records already written by the
stores' flushers, which run a second or so behind the requests.
"""

import base64
import binascii
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import sqlalchemy as sa
from pydantic import BaseModel, Field, model_validator

from serve_app.protocol import WireModel

BucketWidth = Literal["1m", "1h", "1d"]
GroupBy = Literal["api_key_id", "model"]

BUCKET_SECONDS: dict[str, int] = {"1m": 60, "1h": 3600, "1d": 86400}
# OpenAI's number of buckets per page for each width: (default, maximum).
BUCKET_LIMITS: dict[str, tuple[int, int]] = {"1d": (7, 31), "1h": (24, 168), "1m": (60, 1440)}
_CURSOR_PREFIX = "page_"
_LIST_PARAMS = frozenset({"group_by", "api_key_ids", "models", "project_ids", "user_ids"})


# ---------------------------------------------------------------- wire types of the answer


class UsageEmbeddingsResult(BaseModel):
    """The aggregated embeddings usage of one bucket (and one group, when `group_by` is set)."""

    object: Literal["organization.usage.embeddings.result"] = "organization.usage.embeddings.result"
    input_tokens: int
    num_model_requests: int
    project_id: str | None = None  # we have no projects: always null
    user_id: str | None = None  # we have no users apart from keys: always null
    api_key_id: str | None = None  # set when group_by holds api_key_id
    model: str | None = None  # set when group_by holds model
    # --- extensions ---
    images: int = Field(default=0, description="images embedded by these requests (texts count as input_tokens)")


class UsageBucket(BaseModel):
    object: Literal["bucket"] = "bucket"
    start_time: int
    end_time: int
    results: list[UsageEmbeddingsResult]


class UsagePage(BaseModel):
    object: Literal["page"] = "page"
    data: list[UsageBucket]
    has_more: bool
    next_page: str | None = None


# ---------------------------------------------------------------- the query


@dataclass(frozen=True)
class BucketWindow:
    """The buckets of one page: `count` buckets of `width` seconds from `first`, records before `end` only."""

    first: int
    width: int
    count: int
    end: int
    next_page: str | None

    @property
    def range_end(self) -> int:
        """Exclusive end (unix seconds) of the records this page reads."""
        return min(self.first + self.count * self.width, self.end)


def encode_cursor(start_time: int, width: int, first: int) -> str:
    """A cursor names the first bucket of the next page and the query it belongs to (its start and width)."""
    raw = json.dumps({"s": start_time, "w": width, "t": first}, separators=(",", ":")).encode()
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(page: str, start_time: int, width: int) -> int:
    """The first bucket a cursor names; ValueError unless it came from a query with this start and width."""
    if not page.startswith(_CURSOR_PREFIX):
        raise ValueError("is not a cursor from `next_page`")
    body = page[len(_CURSOR_PREFIX):]
    try:
        fields = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        first, s, w = fields["t"], fields["s"], fields["w"]
    except (binascii.Error, ValueError, TypeError, KeyError):
        raise ValueError("is not a cursor from `next_page`") from None
    if not all(type(v) is int for v in (first, s, w)) or (s, w) != (start_time, width):
        raise ValueError("belongs to a query with another start_time or bucket_width")
    if first < start_time or (first - start_time) % width:
        raise ValueError("is not a cursor from `next_page`")
    return first


MAX_TIME = 32503680000  # the year 3000: later times overflow the table's microseconds


class UsageQuery(WireModel):
    """Query parameters of the Usage API, validated: the route turns a ValidationError into a 400.

    `limit` is the number of buckets per page; None takes OpenAI's default for the width (1d: 7, 1h: 24, 1m: 60),
    and more than OpenAI's maximum (1d: 31, 1h: 168, 1m: 1440) is refused. We group and filter by API key and
    model only: there are no projects or users to filter by.
    """

    start_time: int = Field(ge=0, le=MAX_TIME, description="unix seconds, inclusive")
    bucket_width: BucketWidth = "1d"
    end_time: int | None = Field(default=None, ge=0, le=MAX_TIME, description="unix seconds, exclusive; default now")
    group_by: list[GroupBy] = Field(default_factory=list, max_length=2)
    limit: int | None = Field(default=None, ge=1)
    page: str | None = Field(default=None, max_length=256)
    api_key_ids: list[str] | None = Field(default=None, max_length=1000)
    models: list[str] | None = Field(default=None, max_length=100)
    project_ids: list[str] | None = None
    user_ids: list[str] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "UsageQuery":
        if self.end_time is not None and self.end_time <= self.start_time:
            raise ValueError("end_time must be after start_time")
        default, maximum = BUCKET_LIMITS[self.bucket_width]
        if self.limit is None:
            self.limit = default
        elif self.limit > maximum:
            raise ValueError(f"limit must be at most {maximum} for bucket_width={self.bucket_width}")
        if self.project_ids or self.user_ids:
            raise ValueError("this server has no projects or users: filter by api_key_ids or models")
        if self.page is not None:
            try:
                decode_cursor(self.page, self.start_time, BUCKET_SECONDS[self.bucket_width])
            except ValueError as exc:
                raise ValueError(f"page {exc}") from None
        self.group_by = list(dict.fromkeys(self.group_by))  # each field once, in the order given
        return self

    @classmethod
    def from_query_items(cls, items: Iterable[tuple[str, str]]) -> "UsageQuery":
        """Builds the query from URL parameters: lists as the openai SDK sends them (`group_by[]=model`) or as
        repeated keys (`group_by=model&group_by=api_key_id`); a repeated scalar keeps its last value."""
        params: dict[str, object] = {}
        for name, value in items:
            name = name.removesuffix("[]")
            if name in _LIST_PARAMS:
                params.setdefault(name, [])
                params[name].append(value)  # type: ignore[union-attr]
            else:
                params[name] = value
        return cls.model_validate(params)

    def window(self, now: float) -> BucketWindow:
        """The buckets of the page this query asks for; a query with no end_time ends after `now`."""
        width = BUCKET_SECONDS[self.bucket_width]
        end = self.end_time if self.end_time is not None else math.floor(now) + 1
        first = self.start_time if self.page is None else decode_cursor(self.page, self.start_time, width)
        assert self.limit is not None  # set by the validator
        count = max(0, min(self.limit, math.ceil((end - first) / width)))
        after = first + count * width
        next_page = encode_cursor(self.start_time, width, after) if after < end else None
        return BucketWindow(first=first, width=width, count=count, end=end, next_page=next_page)


def usage_select(
    table: sa.Table, window: BucketWindow, group_by: Sequence[str], key_ids: Sequence[str] | None,
    models: Sequence[str] | None,
) -> sa.Select:
    """Per bucket (and group): bucket index, the group's columns, input tokens, requests, images.

    The bucket index is integer arithmetic on microseconds, `(created_at_us - first_us) // width_us`, the same
    on SQLite and PostgreSQL (both divide integers by truncation, which is floor here: the operand is never
    negative). It is computed in a subquery so the outer GROUP BY names a column, not an expression with bound
    parameters (PostgreSQL would not match `$1` in SELECT with `$3` in GROUP BY).
    """
    first_us = window.first * 1_000_000
    end_us = window.range_end * 1_000_000
    width_us = window.width * 1_000_000
    groups = [table.c.key_id if field == "api_key_id" else table.c.model for field in group_by]
    index = ((table.c.created_at_us - sa.literal(first_us, sa.BigInteger)) // sa.literal(width_us, sa.BigInteger))
    inner = sa.select(
        index.label("bucket"), *groups, table.c.input_tokens, table.c.images,
    ).where(
        table.c.created_at_us >= first_us,
        table.c.created_at_us < end_us,
        table.c.status >= 200,  # only answered requests count: see the module's docstring
        table.c.status < 300,
    )
    if key_ids is not None:
        inner = inner.where(table.c.key_id.in_(list(key_ids)))
    if models is not None:
        inner = inner.where(table.c.model.in_(list(models)))
    sub = inner.subquery()
    keys = [sub.c.bucket, *(sub.c[column.name] for column in groups)]
    return sa.select(
        *keys,
        sa.func.coalesce(sa.func.sum(sub.c.input_tokens), 0),
        sa.func.count(),
        sa.func.coalesce(sa.func.sum(sub.c.images), 0),
    ).group_by(*keys).order_by(*keys)


def build_page(window: BucketWindow, rows: Iterable[Sequence], group_by: Sequence[str]) -> UsagePage:
    """The page from `usage_select`'s rows: every bucket of the window, empty ones included."""
    buckets = [
        UsageBucket(start_time=window.first + i * window.width, end_time=window.first + (i + 1) * window.width,
                    results=[])
        for i in range(window.count)
    ]
    for row in rows:
        index, groups, (tokens, requests, images) = int(row[0]), row[1:-3], row[-3:]
        named = dict(zip(group_by, groups))  # group_by's names are the result's field names
        buckets[index].results.append(UsageEmbeddingsResult(
            input_tokens=int(tokens), num_model_requests=int(requests), images=int(images), **named,
        ))
    return UsagePage(data=buckets, has_more=window.next_page is not None, next_page=window.next_page)
