import sys

from mlx_serve.daemon.entry import main

sys.exit(main())
