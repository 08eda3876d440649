"""JSON-lines logs (STREAMREC_LOG_FORMAT=json)."""

from __future__ import annotations

import io
import json
import logging
import logging.config

from streams.logs import JsonFormatter, logging_config


def test_json_lines_carry_time_level_logger_message_and_the_exception():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("streamrec.test-json")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("events batch failed (%s); retry %d", "ConnectionError: \x1b[31mrefused\x1b[0m", 2)
        try:
            raise ValueError("bad")
        except ValueError:
            log.exception("stopped")
    finally:
        log.removeHandler(handler)
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["level"] == "WARNING" and first["logger"] == "streamrec.test-json"
    assert first["message"] == "events batch failed (ConnectionError: refused); retry 2"  # colours dropped
    assert first["time"].endswith("+00:00") and isinstance(first["pid"], int) and "exc" not in first
    assert second["level"] == "ERROR" and "ValueError: bad" in second["exc"]


def test_the_worker_configuration_formats_every_logger_as_chosen():
    json_cfg, text_cfg = logging_config("info", "json"), logging_config("debug", "text")
    assert json_cfg["formatters"]["streamrec"] == {"()": JsonFormatter} and json_cfg["root"]["level"] == "INFO"
    assert "format" in text_cfg["formatters"]["streamrec"] and text_cfg["root"]["level"] == "DEBUG"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logging.config.dictConfig(json_cfg)  # valid for dictConfig (Faust's worker passes it on)
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
