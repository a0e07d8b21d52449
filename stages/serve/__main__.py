import sys

from stages.serve.stage import main

sys.exit(main())
