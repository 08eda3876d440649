"""Shared test configuration. ``make test`` runs the suite in two processes (pytest-xdist,
``--dist loadgroup``); each starts its own session servers, and the controller joins their
reliability reports."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    if _controller(session.config):
        from tests.integration.reliability import clear_parts, report_dir

        clear_parts(report_dir())


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _controller(session.config):
        from tests.integration.reliability import merge_parts, report_dir

        report = merge_parts(report_dir())
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if report is not None and reporter is not None:
            reporter.write_line(f"\nreliability report: {report_dir() / 'reliability-report.json'}\n{report.text()}")
