import sys

from sdxs.cli import main

sys.exit(main())
