import sys

from cafs.cli import main

sys.exit(main())
