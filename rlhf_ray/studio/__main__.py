import sys

from rlhf_ray.studio.cli import main

sys.exit(main())
