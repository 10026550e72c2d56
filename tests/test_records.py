"""Records on the wire: validation at the edge, with messages a producer can act on."""

import base64
import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.records import RecordError, decode_event, decode_item


def enc(doc) -> bytes:
    return json.dumps(doc).encode()


def test_item_with_all_media_forms():
    data = base64.b64encode(b"\x89PNG...").decode()
    item = decode_item(
        enc(
            {
                "id": "i1",
                "title": "T",
                "description": "D",
                "image": {"data": data},
                "audio": "sounds/a.wav",
                "category": "c",
                "tags": ["x"],
                "attributes": {"year": 1999},
                "created_at": "2024-01-01T00:00:00Z",
            }
        )
    )
    assert item.image.data == b"\x89PNG..." and item.audio.path == "sounds/a.wav"
    assert item.created_at == 1704067200.0 and item.text == "T. D"
    assert decode_item(enc({"id": "i", "image": "https://x/y.jpg"})).image.url == "https://x/y.jpg"


def test_missing_modalities_are_normal():
    item = decode_item(enc({"id": "i2"}))
    assert item.image is None and item.audio is None and item.text == ""


def test_delete_is_a_message_on_the_same_topic():
    assert decode_item(enc({"id": "i3", "op": "delete"})).op == "delete"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "invalid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "expected a JSON object"),
        (None, "empty message"),
        (enc({"title": "no id"}), "id: Field required"),
        (enc({"id": 7}), "id: Input should be a valid string"),
        (enc({"id": ""}), "id: String should have at least 1 character"),
        (enc({"id": "x", "colour": "red"}), "colour: Extra inputs are not permitted"),
        (enc({"id": "x", "image": {"path": "a", "url": "https://b"}}), "exactly one of"),
        (enc({"id": "x", "image": {"data": "@@@"}}), "not valid base64"),
        (enc({"id": "x", "schema_version": 2}), "schema_version"),
        (b'{"id": "x", "created_at": NaN}', "created_at: Input should be a finite number"),
        (b'{"id": "x", "attributes": {"w": Infinity}}', "attributes.w"),
    ],
)
def test_bad_items_get_clear_reasons(raw, reason):
    with pytest.raises(RecordError, match=reason):
        decode_item(raw)


EVENT = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "type": "like", "timestamp": 1.5}


def test_event_ok_and_iso_timestamp():
    assert decode_event(enc(EVENT)).timestamp == 1.5
    e = decode_event(
        enc({**EVENT, "type": "rating", "value": 4, "timestamp": "1970-01-01T00:00:10"})
    )
    assert e.value == 4 and e.timestamp == 10.0


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"type": "teleport"}, "type: Input should be"),
        ({"type": "rating"}, "a rating event needs a value"),
        ({"timestamp": None}, "timestamp"),
        ({"timestamp": True}, "timestamp"),
        ({"user_id": ["u"]}, "user_id"),
    ],
)
def test_bad_events_get_clear_reasons(change, reason):
    doc = {**EVENT, **change}
    with pytest.raises(RecordError, match=reason):
        decode_event(enc(doc))


def test_event_needs_a_timestamp():
    doc = dict(EVENT)
    del doc["timestamp"]
    with pytest.raises(RecordError, match="timestamp: Field required"):
        decode_event(enc(doc))


@given(st.binary(max_size=300))
def test_decoders_never_raise_anything_but_record_error(raw):
    for decode in (decode_item, decode_event):
        with contextlib.suppress(RecordError):
            decode(raw)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from([*sorted(EVENT), "value", "context", "x"]),
        st.one_of(
            st.none(),
            st.integers(),
            st.text(max_size=5),
            st.floats(),
            st.lists(st.integers(), max_size=2),
        ),
    )
)
def test_decoders_on_structured_garbage(doc):
    with contextlib.suppress(RecordError):
        decode_event(json.dumps(doc).encode())
