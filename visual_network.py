"""`python visual_network.py --result_file_attack record/<name> ...`, as BackdoorBench's users type it.

The analysis lives in backdoor_lens/analyses/network.py; `backdoor-lens network ...` is the same command.
"""
from backdoor_lens.cli import run_analysis

if __name__ == "__main__":
    run_analysis("network")
