from weitiao.cli import main
import sys

sys.exit(main())
