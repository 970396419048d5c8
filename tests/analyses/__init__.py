"""Tests of backdoor_lens.analyses."""
