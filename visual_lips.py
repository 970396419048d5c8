"""`python visual_lips.py --result_file_attack record/<name> ...`, as BackdoorBench's users type it.

The analysis lives in backdoor_lens/analyses/lips.py; `backdoor-lens lips ...` is the same command.
"""
from backdoor_lens.cli import run_analysis

if __name__ == "__main__":
    run_analysis("lips")
