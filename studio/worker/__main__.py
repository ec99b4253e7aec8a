import sys

from studio.worker.main import main

sys.exit(main())
