"""The pure core: the client lifecycle, the router's window, rate limits, the retry policy, the
event handlers and batch draining. No I/O here: callers pass the time and do the I/O the core
asks for."""
