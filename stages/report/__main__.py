import sys

from stages.report.stage import main

sys.exit(main())
