"""`python -m bagel_ray` runs the `bagel-ray` command line."""

import sys

from bagel_ray.cli import main

sys.exit(main())
