"""Job entrypoint: score -> train -> eval -> report from one config.

python pipelines/distill.py --config configs/quickstart.yaml [--verbose: Ray Data progress too]
ray job submit --working-dir . -- python pipelines/distill.py --config configs/testbed.yaml
"""

import sys

from pocl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
