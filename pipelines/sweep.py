"""Job entrypoint: one scoring pass, then a Ray Tune sweep over the curriculum (`pocl-ray tune`).

python pipelines/sweep.py --config configs/quickstart-sweep.yaml [--verbose: Ray Data progress too]
ray job submit --working-dir . -- python pipelines/sweep.py --config configs/testbed.yaml --output runs/sweep
"""

import sys

from pocl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
