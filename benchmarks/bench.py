"""``python benchmarks/bench.py --preset edge --json out.json`` (same as ``egx bench``)."""
import sys

from earthgptx.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
