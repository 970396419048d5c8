"""Shared machinery of Backdoor Lens: the only package that knows BackdoorBench's record format."""
