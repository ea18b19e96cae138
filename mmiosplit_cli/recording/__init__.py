"""Record and replay of the exchanges with device services (``mmiosplit run --record``, ``mmiosplit replay``)."""
