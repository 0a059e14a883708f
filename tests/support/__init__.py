"""Helpers shared by the test suites (simulated vLLM servers in `tests.support.sim`)."""
