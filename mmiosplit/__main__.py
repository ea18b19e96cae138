"""``python -m mmiosplit`` is the same as the ``mmiosplit`` command."""

from mmiosplit.cli import main

raise SystemExit(main())
