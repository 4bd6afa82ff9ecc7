"""Time the LoRA linear layer: bare frozen GEMM, HF PEFT, peftfast on the torch and triton backends, same inputs.

The same suite as `peftfast bench`, with the same options (results go to `--output-dir`, by default outside the
checkout; `--output-dir bench/results` adds a run to the committed reference results). The grid is the GPU one on a
CUDA GPU and a small CPU set otherwise; see bench/README.md.

    python bench/bench_lora_linear.py                                  # the whole grid
    python bench/bench_lora_linear.py --quick                          # a smoke test
    python bench/bench_lora_linear.py --shapes 4096x14336 --tokens 8192 --ranks 16 64
"""

import argparse
import sys

from peftfast.bench import add_arguments, run_from_args


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_from_args(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
