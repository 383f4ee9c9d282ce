"""Job entrypoint: the sparse-parity curriculum-extraction sandbox (`pocl-ray parity`).

    python pipelines/parity.py --output runs/parity [--config configs/parity.yaml]
    ray job submit --working-dir . -- python pipelines/parity.py --output runs/parity --config configs/parity-paper.yaml

Writes DIR/parity/results.json and DIR/parity/curves.png and prints a one-screen summary.
"""

import sys

from pocl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["parity", *sys.argv[1:]]))
