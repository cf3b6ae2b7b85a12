"""Property tests of the parsers that take untrusted text: whatever arrives, they
answer or refuse with the project's own errors, and round-trip where they can."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fluxserve.api.account_routes import _decode_cursor, _encode_cursor
from fluxserve.api.file_response import _span
from fluxserve.api.schemas import SubmitBody
from fluxserve.data_references import decode_data_reference
from fluxserve.errors import InvalidRequest, PayloadTooLarge, UnsafeURLError
from fluxserve.net_policy import NetPolicy, check_url
from fluxserve.sizes import SIZE_CHOICES
from fluxserve.uploads import MAX_NAME_BYTES, destination, stored_name
from fluxserve.webhooks.retry import parse_retry_after

# Bounded, so the suite stays fast; no deadline, as the machine may be busy.
BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text as it can arrive in JSON: any code point, lone surrogates included.
ANY_TEXT = st.text(st.characters(codec=None), max_size=60)
DIGITS = st.text("0123456789", min_size=1, max_size=40)


# Size ----------------------------------------------------------------------------------


@BOUNDED
@given(size=st.one_of(ANY_TEXT, st.sampled_from(SIZE_CHOICES)), resolution=ANY_TEXT)
def test_size_and_resolution_are_accepted_or_refused_by_name(size: str, resolution: str) -> None:
    body = {
        "model": "flux-2-pro",
        "input": {"prompt": "a cat", "size": size, "resolution": resolution},
    }
    try:
        parsed = SubmitBody.model_validate(body)
    except ValidationError as exc:
        message = str(exc)
        assert "input.size" in message or "input.resolution" in message
        return
    assert parsed.input.size in SIZE_CHOICES
    assert parsed.input.resolution in ("1K", "2K")


# Range -----------------------------------------------------------------------------------


RANGE_TEXT = st.one_of(
    ANY_TEXT,
    st.builds(
        lambda first, last: f"bytes={first}-{last}",
        st.one_of(st.just(""), DIGITS),
        st.one_of(st.just(""), DIGITS),
    ),
)


@BOUNDED
@given(header=RANGE_TEXT, size=st.integers(min_value=0, max_value=10**12))
def test_a_range_is_a_span_inside_the_file_or_none(header: str, size: int) -> None:
    span = _span(header, size)
    if span is None or span == ():
        return
    start, end = span
    assert 0 <= start < end <= size


@BOUNDED
@given(size=st.integers(min_value=1, max_value=10**9), data=st.data())
def test_a_range_inside_the_file_is_read_back_exactly(size: int, data: Any) -> None:
    start = data.draw(st.integers(min_value=0, max_value=size - 1))
    last = data.draw(st.integers(min_value=start, max_value=size - 1))
    zeros = data.draw(st.integers(min_value=0, max_value=3000))
    assert _span(f"bytes={'0' * zeros}{start}-{last}", size) == (start, last + 1)
    assert _span(f"bytes=-{last + 1}", size) == (size - last - 1, size)


# Cursor ----------------------------------------------------------------------------------


@BOUNDED
@given(
    cursor=st.one_of(
        ANY_TEXT,
        st.builds(
            lambda t: base64.urlsafe_b64encode(t.encode("utf-8", "surrogatepass")).decode(),
            ANY_TEXT,
        ),
    )
)
def test_a_cursor_is_a_number_or_a_400(cursor: str) -> None:
    try:
        number = _decode_cursor(cursor)
    except InvalidRequest:
        return
    assert number is not None and 0 <= number < 10**19


@BOUNDED
@given(seq=st.integers(min_value=0, max_value=2**63 - 1))
def test_a_cursor_round_trips(seq: int) -> None:
    assert _decode_cursor(_encode_cursor(seq)) == seq


# data: URLs -----------------------------------------------------------------------------

DATA_URL_TEXT = st.one_of(
    ANY_TEXT.map(lambda text: "data:" + text),
    st.builds(
        lambda media, params, payload: f"data:{media}{params},{payload}",
        st.sampled_from(
            ["image/png", "image/jpeg", "IMAGE/GIF", "image/svg+xml", "", "text/plain"]
        ),
        st.sampled_from([";base64", "", ";charset=x;base64", ";BASE64"]),
        st.one_of(ANY_TEXT, st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode())),
    ),
)


@BOUNDED
@given(url=DATA_URL_TEXT)
def test_a_data_url_decodes_or_is_refused_as_a_4xx(url: str) -> None:
    try:
        data = decode_data_reference(url, 100, "input.image_urls[0]")
    except (InvalidRequest, PayloadTooLarge) as exc:
        assert exc.message.startswith("input.image_urls[0]")
        return
    assert len(data) <= 100


@BOUNDED
@given(data=st.binary(max_size=300), media=st.sampled_from(["image/png", "image/webp"]))
def test_a_data_url_round_trips_its_bytes(data: bytes, media: str) -> None:
    url = f"data:{media};base64,{base64.b64encode(data).decode()}"
    if len(data) > 200:
        with pytest.raises(PayloadTooLarge):
            decode_data_reference(url, 200, "f")
    else:
        assert decode_data_reference(url, 200, "f") == data


# URLs through the net guard ---------------------------------------------------------------

HOST = st.one_of(
    st.from_regex(r"[a-z0-9.\-]{0,20}", fullmatch=True),
    st.from_regex(r"xn--[a-z0-9\-]{0,10}", fullmatch=True),
    ANY_TEXT,
    st.ip_addresses().map(lambda ip: f"[{ip}]" if ip.version == 6 else str(ip)),
)
URL_TEXT = st.one_of(
    ANY_TEXT,
    st.builds(
        lambda scheme, host, port, path: f"{scheme}://{host}{port}/{path}",
        st.sampled_from(["http", "https", "ftp", "HTTP", ""]),
        HOST,
        st.one_of(st.just(""), st.integers(min_value=-5, max_value=99999).map(lambda p: f":{p}")),
        ANY_TEXT,
    ),
)


@BOUNDED
@given(url=URL_TEXT, private=st.booleans())
def test_the_net_guard_accepts_or_refuses_any_url(url: str, private: bool) -> None:
    try:
        check_url(url, NetPolicy(allow_private_networks=private))
    except UnsafeURLError:
        return


# Retry-After, upload names -------------------------------------------------------------


@BOUNDED
@given(value=st.one_of(ANY_TEXT, DIGITS, st.none()))
def test_retry_after_is_seconds_or_none(value: str | None) -> None:
    seconds = parse_retry_after(value, 1_700_000_000.0)
    assert seconds is None or seconds >= 0


@BOUNDED
@given(path=st.one_of(st.none(), ANY_TEXT), name=st.one_of(st.none(), ANY_TEXT))
def test_an_upload_destination_is_storable_or_a_400(path: str | None, name: str | None) -> None:
    try:
        where = destination(path, name)
    except InvalidRequest:
        return
    if where.file_name is not None:
        stored = stored_name(where.file_name, "PNG")
        assert len(stored.encode()) <= MAX_NAME_BYTES
    for segment in (where.upload_path or "").split("/"):
        assert len(segment.encode()) <= MAX_NAME_BYTES
