"""Time the LoRA linear layer: bare frozen GEMM, HF PEFT, peftfast on the torch and triton backends, same inputs.

The same suite as `peftfast bench`, with results going to bench/results/ next to this script wherever it is run
from. The grid is the GPU one on a CUDA GPU and a small CPU set otherwise; see bench/README.md.

    python bench/bench_lora_linear.py                                  # the whole grid
    python bench/bench_lora_linear.py --quick                          # a smoke test
    python bench/bench_lora_linear.py --shapes 4096x14336 --tokens 8192 --ranks 16 64
"""

import argparse
import sys
from pathlib import Path

from peftfast.bench import add_arguments, run_from_args


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, default_output_dir=Path(__file__).resolve().parent / "results")
    return run_from_args(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
