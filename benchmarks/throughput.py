"""Tokens/s of NGSD vs plain generate(), a bare loop of its forwards, and an uncached straw-man.

    .venv/bin/python benchmarks/throughput.py [--new-tokens 128 512] [--repeats 2] [--dtype float32]

Everything is measured in one process on the embedded pair (SmolLM2-135M-Instruct + LoRA
expert); the printed ratios are what to compare across machines, not the absolute numbers.
"""

import argparse

from ngsd_integrations.benchmark import print_throughput

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    print_throughput(args.new_tokens, repeats=args.repeats, dtype=args.dtype)
