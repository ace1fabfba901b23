import sys

from hepopt.cli import main

sys.exit(main())
