import sys

from .dtk_main import main

sys.exit(main())
