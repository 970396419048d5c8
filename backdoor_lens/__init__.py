"""Backdoor Lens: look inside backdoored image classifiers from BackdoorBench's records.

    from backdoor_lens.analysis import get, registry
    registry()            # {name: Analysis}
    get("tac").main(["--result_file_attack", "record/badnet_demo"])

The layers: `record` (BackdoorBench's format), `models`, `stats` (the math), `attribution`,
`landscape`, `plot` (drawing), `analyses` (one module per analysis), `report`, and the small
runtime (`cli`, `args`, `context`, `output`, `device`, `errors`).
"""
__version__ = "0.2.0"
