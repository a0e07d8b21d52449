import sys

from stages.gguf.stage import main

sys.exit(main())
