import sys

from agentgw.cli import main

sys.exit(main())
