import sys

from cafs.cli.app import main

sys.exit(main())
