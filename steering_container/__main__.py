import sys

from steering_container.cli import main

sys.exit(main())
