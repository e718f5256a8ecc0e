"""The generation domain: settings, agents, providers, scoring, traces, stores and the runner.

Plain Python with no Ray, so the Serve layer and the CLI run the same code."""
