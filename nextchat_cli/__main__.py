"""``python -m nextchat_cli``: the ``nextchat`` command."""

import sys

from nextchat_cli.main import main

sys.exit(main())
