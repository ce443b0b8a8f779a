"""The native client: the sans-IO :class:`~.core.ClientCore`, its asyncio driver (``driver``),
saved state (``state``), media transfers, and the ``kalandra`` command line (``cli``)."""
