"""Tests of backdoor_lens.landscape."""
