"""Tests of backdoor_lens.attribution."""
