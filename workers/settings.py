"""The settings object lives in :mod:`streams.settings` (so that ``streams/`` never imports from
``workers/``); this module keeps the CLI's and deployments' ``workers.settings`` imports working."""

from streams.settings import OTHER_VARIABLES, Settings, mask_url, unknown_variables

__all__ = ["OTHER_VARIABLES", "Settings", "mask_url", "unknown_variables"]
