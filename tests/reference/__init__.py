"""Slow, paper-faithful implementations used only as oracles by the tests."""
