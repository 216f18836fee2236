import sys

from pertbench.cli.main import main

sys.exit(main())
