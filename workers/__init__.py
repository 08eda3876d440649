"""Process entry points: the CLI, the worker, the embedded stack, the demo and the benchmark."""
