"""``python -m mmiosplit_cli`` is the same as the ``mmiosplit`` command."""

from mmiosplit_cli.cli import main

raise SystemExit(main())
