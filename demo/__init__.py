"""Builds the embedded demo records (no download) in BackdoorBench's on-disk format."""
