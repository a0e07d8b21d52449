import sys

from stages.generate.stage import main

sys.exit(main())
