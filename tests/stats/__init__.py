"""Tests of backdoor_lens.stats."""
