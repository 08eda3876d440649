"""Every hostile message of ``tests/hostile.py`` is rejected by the validation of its topic with
a code and a reason (clicks on unknown items pass validation: the pipeline rejects those, as a
unit test of the pipeline shows)."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings

from schemas import InvalidMessage, Limits, parse_catalog, parse_event, parse_request
from tests.hostile import UNKNOWN_ITEM, Hostile, hostile

LIMITS = Limits()
NOW = 1_767_225_600.0
ITEMS = ("it-1", "it-2", "it-3")
PARSERS = {"events": parse_event, "catalog": parse_catalog, "requests": parse_request}
SEEN: Counter = Counter()


@settings(max_examples=1500, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(hostile(LIMITS, NOW, ITEMS))
def test_every_hostile_message_is_rejected_with_a_reason(h: Hostile):
    SEEN[h.fault] += 1
    if h.fault == "unknown_item":
        click = parse_event(h.value, LIMITS, NOW)
        assert click.item_id.startswith(UNKNOWN_ITEM) and click.item_id not in ITEMS
        return
    try:
        record = PARSERS[h.topic](h.value, LIMITS, NOW)
    except InvalidMessage as exc:
        assert exc.error and exc.reason
    else:
        raise AssertionError(f"{h.fault} on {h.topic} accepted: {record!r} from {h.value[:300]!r}")


def test_every_fault_was_tried():
    """Each kind of fault came up in the property test (run here if it has not run yet)."""
    if not SEEN:
        test_every_hostile_message_is_rejected_with_a_reason()
    faults = {"not_utf8", "broken_json", "not_object", "empty", "wrong_type", "missing_field", "extra_field",
              "unknown_type", "wrong_schema", "huge_text", "huge_id", "huge_message", "negative_timestamp",
              "future_timestamp", "non_finite", "control_chars", "empty_id", "lone_surrogate", "deep_nesting",
              "unknown_item", "bad_weight", "huge_list", "bad_k"}
    assert faults <= set(SEEN), sorted(faults - set(SEEN))
