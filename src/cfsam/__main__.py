import sys

from cfsam.cli import main

sys.exit(main())
