"""``python -m mmiosplit`` is the same as the ``mmiosplit`` command."""

from mmiosplit_cli.cli import main

raise SystemExit(main())
