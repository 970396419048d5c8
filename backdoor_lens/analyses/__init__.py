"""One module per analysis, each declaring `ANALYSIS = Analysis(...)` (see backdoor_lens.analysis)."""
