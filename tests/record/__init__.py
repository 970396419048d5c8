"""Tests of backdoor_lens.record."""
