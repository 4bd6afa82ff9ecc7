"""The compile gate as a script: every kernel config compiled for A100 (sm_80) and H100 (sm_90) on this machine, no
GPU needed; a table of registers, spills, shared memory and tensor-core use, and a verdict. Same options as
`peftfast gate` (see peftfast/compile_gate.py).

    python bench/compile_gate.py                 # the representative subset (about a minute)
    python bench/compile_gate.py --full --json bench/results/compile_gate.json
"""

import argparse
import sys

from peftfast.compile_gate import add_arguments, run_from_args


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_from_args(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
