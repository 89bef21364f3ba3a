import sys

from pibl.cli import main

sys.exit(main())
