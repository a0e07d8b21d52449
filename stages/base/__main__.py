import sys

from stages.base.stage import main

sys.exit(main())
