"""``python benchmarks/bench.py --preset edge --json out.json`` (same as ``egx bench``)."""
import argparse
import sys

from benchmarks.run import add_bench_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench.py",
                                     description="Benchmark PyTorch and the built engines side by side.")
    add_bench_arguments(parser)
    sys.exit(main(parser.parse_args()))
