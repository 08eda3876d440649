"""The Faust app (``create_app``), its topics and agents, and the store interfaces they write through."""
